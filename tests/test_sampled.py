"""Sampled and hybrid targets: draws, shard round trip, reproducible bytes, end to end on local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.capture.targets import SampledTargets, TokenTargets, sample_targets
from kdcache.codec import CodecParams, error_bound
from kdcache.formats.parquet import ShardWriter, read_shard


def test_sample_mode_draws_unique_ids_with_counts():
    logits = torch.randn(20, 50) * 3
    g = torch.Generator().manual_seed(0)
    head, s = sample_targets(logits, num_samples=50, head=0, temperatures=[1.0, 2.0], generator=g)
    assert head.ids.shape == (20, 0) and torch.all(head.tail_logprobs == 0)
    assert torch.all(s.counts.sum(-1) == 50)
    valid = s.counts > 0
    for row in range(20):
        ids = s.ids[row][valid[row]]
        assert torch.all(ids[1:] > ids[:-1])  # unique, ascending
    ref = torch.log_softmax(logits, -1).gather(1, s.ids)
    assert torch.allclose(s.logprobs[valid], ref[valid], atol=1e-6)
    assert torch.all(torch.isneginf(s.logprobs[~valid]))


def test_hybrid_draws_only_outside_the_head_and_estimates_the_tail():
    logits = torch.randn(4, 30) * 2
    head, s = sample_targets(
        logits, num_samples=255, head=5, temperatures=[1.0], generator=torch.Generator().manual_seed(1)
    )
    for row in range(4):
        drawn = set(s.ids[row][s.counts[row] > 0].tolist())
        assert not drawn & set(head.ids[row].tolist())
    # the importance-weighted estimate of the tail distribution is close to the truth with many draws
    p = torch.softmax(logits.double(), -1)
    est = torch.zeros_like(p)
    reps = 200
    for r in range(reps):
        _, s = sample_targets(
            logits, num_samples=50, head=5, temperatures=[1.0], generator=torch.Generator().manual_seed(r)
        )
        w = head.tail_logprobs[:, :1].double().exp() * s.counts.double() / 50
        est.scatter_add_(1, s.ids, w)
    est /= reps
    est.scatter_(1, head.ids, p.gather(1, head.ids))
    assert (est - p).abs().max() < 0.02


def test_shard_round_trip_with_samples():
    rng = np.random.default_rng(0)
    t, m = 7, 5
    ids = np.sort(rng.choice(1000, size=(t, m)), axis=1)
    counts = rng.integers(0, 4, size=(t, m)).astype(np.int32)
    counts[2] = 0  # a token with no samples
    ids = np.where(counts > 0, ids, 0)
    for row in range(t):  # make valid ids unique
        valid = np.flatnonzero(counts[row])
        ids[row, valid] = np.sort(rng.choice(1000, size=len(valid), replace=False))
    lps = np.where(counts > 0, -rng.exponential(2, size=(t, m)), -np.inf).astype(np.float32)
    writer = ShardWriter(k=2, num_temperatures=1, num_samples=10)
    head_ids = np.tile([3, 9], (t, 1))
    head = TokenTargets(
        ids=head_ids,
        logprobs=np.full((t, 2), -1.0, np.float32),
        log_normalizers=np.zeros((t, 1)),
        tail_logprobs=np.zeros((t, 1)),
        entropy=np.ones(t),
    )
    writer.add(5, np.arange(t), head, SampledTargets(ids=ids, counts=counts, logprobs=lps, num_samples=10))
    data = read_shard(writer.finish(), k=2, num_temperatures=1)
    got = {}
    for row in range(t):
        valid = data.sample_counts[row] > 0
        got[row] = dict(zip(data.sample_ids[row][valid].tolist(), data.sample_counts[row][valid].tolist()))
        want = {int(i): int(c) for i, c in zip(ids[row], counts[row]) if c > 0}
        assert got[row] == want
        codec = CodecParams()
        want_lp = {int(i): float(lp) for i, lp, c in zip(ids[row], lps[row], counts[row]) if c > 0}
        for i, lp in zip(data.sample_ids[row][valid], data.sample_logprobs[row][valid]):
            want = max(want_lp[int(i)], codec.logprob_min)
            assert abs(lp - want) <= error_bound(np.float32(want), codec)
    assert data.sample_counts[2].sum() == 0
    np.testing.assert_array_equal(data.target_ids, head_ids)


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_sampled_job_end_to_end_is_reproducible(ray_session, tiny_teacher, tmp_path, mode):
    from conftest import stdlib_texts, write_jsonl

    from kdcache.capture.job import run_cache_job
    from kdcache.config import load_config
    from kdcache.read.reader import open_cache

    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": t} for t in stdlib_texts(4, 600)])
    common = [
        f"teacher.model={tiny_teacher}",
        f"data.source={tmp_path}/d/*.jsonl",
        f"targets.mode={mode}",
        "targets.samples=20",
        "targets.head=4",
        "data.max_length=64",
        "data.unit_bytes=800",
        "cluster.num_actors=2",
        "cluster.batch_tokens=256",
        "cluster.progress=false",
    ]
    m1 = run_cache_job(load_config(None, [*common, f"output.uri={tmp_path}/c1"]))
    m2 = run_cache_job(load_config(None, [*common, f"output.uri={tmp_path}/c2"]))
    assert [u["sha256"] for u in m1["units"]] == [u["sha256"] for u in m2["units"]]  # same draws, same bytes
    cache = open_cache(f"{tmp_path}/c1")
    seq = next(cache.iter_sequences())
    assert seq["target_ids"].shape[1] == (4 if mode == "hybrid" else 0)
    assert np.all(seq["sample_counts"].sum(-1) == 20)
    assert m1["fingerprint_inputs"]["targets"]["samples"] == 20
    from kdcache.tools.info import cache_summary, format_summary

    summary = cache_summary(f"{tmp_path}/c1")  # info works on sampled caches (k may be 0)
    assert summary["mode"] == mode and summary["bytes_per_entry"] is None
    assert "bytes/token" in format_summary(summary)


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_dataset_serves_sampled_caches_to_sampled_kl(ray_session, tiny_teacher, tmp_path, mode):
    from conftest import stdlib_texts, write_jsonl

    from kdcache.capture.job import run_cache_job
    from kdcache.config import load_config
    from kdcache.losses import sampled_kl
    from kdcache.read.dataset import KDCacheDataset

    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": t} for t in stdlib_texts(3, 300)])
    run_cache_job(
        load_config(
            None,
            [
                f"teacher.model={tiny_teacher}",
                f"data.source={tmp_path}/d/*.jsonl",
                f"output.uri={tmp_path}/c",
                f"targets.mode={mode}",
                "targets.samples=30",
                "targets.head=4",
                "data.max_length=48",
                "cluster.num_actors=1",
                "cluster.batch_tokens=256",
                "cluster.progress=false",
            ],
        )
    )
    ds = KDCacheDataset(f"{tmp_path}/c", batch_size=2, shuffle=False)
    batch = next(iter(ds))
    mask = batch["loss_mask"]
    total = batch["sample_weights"].sum(-1)[mask]
    if mode == "sample":
        assert torch.allclose(total, torch.ones_like(total))
    else:
        assert torch.allclose(total, batch["tail_logprob"][mask].exp(), atol=1e-6)
    logits = torch.randn(*batch["input_ids"].shape, 320, requires_grad=True)
    loss = sampled_kl(logits, batch)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        KDCacheDataset(f"{tmp_path}/c", batch_size=2, temperature=2.0)
