"""Positions without targets (issue 14's storage side): a writer given `target_mask` stores targets at the True
positions only; every read path carries the mask (`iter_sequences`' `loss_mask`, batches' `loss_mask` = attention AND
target mask, compact batches too), every loss honours it, and the manifest and `kdcache info` count the positions
with targets. (tests/test_format_spec.py decodes masked shards from the spec and joins targets to tokens in DuckDB
and polars, and checks the bytes.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_cache import write_fake_cache
from test_format_spec import build_cache

from kdcache import losses
from kdcache.capture.targets import select_topk
from kdcache.formats import get_format
from kdcache.losses.compact import expand_targets
from kdcache.read.collate import IGNORE_INDEX
from kdcache.read.dataset import KDCacheDataset
from kdcache.read.reader import open_cache
from kdcache.tools.info import cache_summary, format_summary
from kdcache.tools.verify import verify_cache


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_writer_checks_the_mask_against_the_rows(fmt):
    writer = get_format(fmt).ShardWriter(k=4, num_temperatures=1)
    head = select_topk(torch.randn(3, 50), 4, [1.0])
    with pytest.raises(ValueError, match="target_mask must be a \\[5\\] bool array"):
        writer.add(1, np.arange(5), head, target_mask=np.array([1, 0, 1, 1, 0]))
    with pytest.raises(ValueError, match="targets must be \\[2, 4\\]"):
        writer.add(1, np.arange(5), head, target_mask=np.array([True, False, False, True, False]))
    writer.add(1, np.arange(5), head, target_mask=np.array([True, False, True, True, False]))
    writer.add(2, np.arange(3), head)  # no mask: every position
    assert (writer.num_tokens, writer.num_target_tokens, writer.num_sequences) == (8, 6, 2)
    encoded = writer.encode_sequence(
        3, np.arange(4), select_topk(torch.randn(0, 50), 4, [1.0]), target_mask=np.zeros(4, bool)
    )
    writer.add_encoded(encoded)  # a sequence without any target: its tokens only
    shard = get_format(fmt).read_shard(writer.finish(), k=4, num_temperatures=1)
    assert shard.num_tokens == 12 and shard.num_target_tokens == 6
    assert shard.target_mask.tolist() == [True, False, True, True, False] + [True] * 3 + [False] * 4
    np.testing.assert_array_equal(shard.target_ids[shard.target_mask][:3], head.ids[:3].numpy())


def _batches(root, **kw) -> list[dict]:
    return list(KDCacheDataset(str(root), batch_size=3, seed=2, **kw))


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
@pytest.mark.parametrize("mode", ["topk", "hybrid"])
def test_batches_carry_the_target_mask_host_and_compact(tmp_path, fmt, mode):
    build_cache(tmp_path, fmt=fmt, mode=mode, masked=0.4, num_units=2, seqs_per_unit=4)
    sequences = {int(s["seq_id"]): s for s in open_cache(str(tmp_path)).iter_sequences()}
    host, compact = _batches(tmp_path), _batches(tmp_path, compact_targets=True)
    assert len(host) == len(compact) > 1
    seen = 0
    for h, c in zip(host, compact):
        for row, seq_id in enumerate(h["seq_id"].tolist()):
            if seq_id < 0:
                assert not h["loss_mask"][row].any()
                continue
            s = sequences[seq_id]
            n = len(s["input_ids"])
            mask = torch.from_numpy(np.asarray(s["loss_mask"]))
            assert torch.equal(h["loss_mask"][row, :n], mask) and not h["loss_mask"][row, n:].any()
            assert bool(h["attention_mask"][row, :n].all())  # every token is input, with a target or not
            holes = ~mask
            assert (h["labels"][row, :n][holes] == IGNORE_INDEX).all()
            assert (
                torch.isneginf(h["target_logprobs"][row, :n][holes]).all()
                and (h["target_ids"][row, :n][holes] == 0).all()
            )
            np.testing.assert_array_equal(h["target_ids"][row, :n][mask].numpy(), s["target_ids"][s["loss_mask"]])
            seen += int(mask.sum())
        assert torch.equal(c["loss_mask"], h["loss_mask"])
        expanded = expand_targets(c)
        for key in ("target_ids", "target_logprobs", "tail_logprobs", "log_normalizers", "entropy", "labels"):
            assert torch.equal(expanded[key], h[key]), key
    assert seen == sum(int(s["loss_mask"].sum()) for s in sequences.values())


LOSS_KINDS = ["forward_kl", "reverse_kl", "jsd", "tvd", "renormalized_topk_kl", "sampled_kl"]


@pytest.mark.parametrize("compact", [False, True])
def test_every_loss_honours_the_mask(tmp_path, compact):
    """What a masked position holds never matters: scrambling it changes neither a loss nor its gradient, the
    gradient there is 0, and the mean is over the positions with targets only."""
    build_cache(tmp_path, mode="hybrid", masked=0.5, num_units=1, seqs_per_unit=6, vocab=300)
    batch = _batches(tmp_path, compact_targets=compact)[0]
    mask = batch["loss_mask"]
    assert mask.any() and (~mask & batch["attention_mask"].bool()).any()
    scrambled = dict(batch)
    gen = torch.Generator().manual_seed(0)
    holes = ~mask
    for key in ("target_gap_planes", "target_codes", "target_ids", "sample_ids"):
        if key in scrambled:
            noise = torch.randint(0, 2, scrambled[key].shape, generator=gen).to(scrambled[key].dtype)
            scrambled[key] = torch.where(holes[..., None], noise, scrambled[key])
    for key in ("target_logprobs", "sample_logprobs", "sample_weights"):
        if key in scrambled:
            noise = -torch.rand(scrambled[key].shape, generator=gen)
            scrambled[key] = torch.where(
                holes[..., None], noise.abs() if key == "sample_weights" else noise, scrambled[key]
            )
    for key in ("tail_logprob", "entropy"):
        scrambled[key] = torch.where(holes, -torch.rand(holes.shape, generator=gen), scrambled[key])
    logits = torch.randn(*mask.shape, 300, generator=gen, dtype=torch.float64)
    for kind in LOSS_KINDS:
        grads = []
        values = []
        for b in (batch, scrambled):
            x = logits.clone().requires_grad_(True)
            loss = losses.distillation_loss(x, b, kind=kind, alpha=0.7, temperature=1.0)
            loss.backward()
            values.append(loss.detach())
            grads.append(x.grad)
        torch.testing.assert_close(values[0], values[1], msg=kind)
        ignoring = dict(scrambled, loss_mask=batch["attention_mask"].bool())  # the test can fail: without the mask
        try:  # the scrambled positions count (compact batches may even decode ids past the vocabulary)
            assert not torch.isclose(losses.distillation_loss(logits, ignoring, kind=kind, alpha=0.7), values[0]), kind
        except RuntimeError:
            assert compact, kind
        torch.testing.assert_close(grads[0], grads[1], msg=kind)
        assert (grads[0][holes] == 0).all(), kind
        # the mean is over the positions with targets: duplicating the batch with every position masked adds nothing
        doubled = {
            key: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim >= 2 else v for key, v in batch.items()
        }
        doubled["loss_mask"] = torch.cat([mask, torch.zeros_like(mask)])
        doubled["labels"] = torch.cat([batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX)])
        twice = losses.distillation_loss(torch.cat([logits, logits]), doubled, kind=kind, alpha=0.7)
        torch.testing.assert_close(twice, values[0], msg=kind)


def test_manifest_info_and_verify_count_positions_with_targets(tmp_path):
    manifest = build_cache(tmp_path, masked=0.5, num_units=2, seqs_per_unit=5, min_len=40, max_len=60, k=8)
    stats = manifest["stats"]
    assert stats["num_target_tokens"] == sum(u["num_target_tokens"] for u in manifest["units"]) < stats["num_tokens"]
    summary = cache_summary(str(tmp_path))
    fraction = stats["num_target_tokens"] / stats["num_tokens"]
    assert summary["target_token_fraction"] == pytest.approx(fraction) and 0.35 < fraction < 0.65
    assert summary["bytes_per_entry"] == pytest.approx(stats["total_bytes"] / stats["num_target_tokens"] / 8)
    assert f"trained-token fraction {fraction:.3f}" in format_summary(summary)
    assert verify_cache(str(tmp_path)).ok and verify_cache(str(tmp_path), deep=True).ok
    # a manifest whose target count disagrees with its shard is refused on read, and reported by verify
    import json

    manifest["units"][0]["num_target_tokens"] -= 1
    manifest["stats"]["num_target_tokens"] -= 1
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    from kdcache.errors import CorruptShardError

    with pytest.raises(CorruptShardError, match="target positions, the manifest declares"):
        list(open_cache(str(tmp_path)).iter_sequences())
    for deep in (False, True):
        report = verify_cache(str(tmp_path), deep=deep)
        expected = "target positions, the manifest declares" if deep else "target tokens, the manifest records"
        assert not report.ok and expected in str(report.problems), report.problems


def test_fake_cache_with_masks_reads_back(tmp_path):
    manifest = write_fake_cache(str(tmp_path), num_units=2, seqs_per_unit=3, masked=0.5)
    seqs = list(open_cache(str(tmp_path)).iter_sequences())
    assert sum(int(s["loss_mask"].sum()) for s in seqs) == manifest["stats"]["num_target_tokens"]
    assert manifest["stats"]["num_target_tokens"] < manifest["stats"]["num_tokens"]
