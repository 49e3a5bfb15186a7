"""Compact batches (`KDCacheDataset(compact_targets=True)`): the head travels as stored (id steps and log-prob
codes) and `expand_targets` / the losses decode it into exactly the batch the host path makes."""

from __future__ import annotations

import pytest
import torch
from test_format_spec import build_cache

from kdcache import losses
from kdcache.losses.compact import expand_targets
from kdcache.read.dataset import KDCacheDataset


def both(root, **kw) -> tuple[list[dict], list[dict]]:
    host = list(KDCacheDataset(str(root), batch_size=3, seed=1, **kw))
    compact = list(KDCacheDataset(str(root), batch_size=3, seed=1, compact_targets=True, **kw))
    assert len(host) == len(compact) > 1
    return host, compact


@pytest.mark.parametrize(
    "fmt, mode, logprobs, vocab",
    [
        ("parquet", "topk", "u8", 300),  # uint16 steps, uint8 codes
        ("parquet", "topk", "u16", 70_000),  # int32 steps, uint16 codes
        ("parquet", "topk", "f32", 300),  # steps compact, log-probs stored as float32 already
        ("parquet", "hybrid", "u8", 300),  # the head compact, the samples as usual
        ("zarr", "topk", "u8", 300),  # Zarr shards serve compact batches too
        ("zarr", "topk", "u16", 70_000),
        ("zarr", "hybrid", "u8", 300),
    ],
)
def test_expanded_compact_batches_equal_host_batches(tmp_path, fmt, mode, logprobs, vocab):
    build_cache(tmp_path, fmt=fmt, mode=mode, logprobs=logprobs, vocab=vocab, num_units=2, seqs_per_unit=4)
    host, compact = both(tmp_path)
    for h, c in zip(host, compact):
        assert "target_gap_planes" in c and "target_ids" not in c and c["target_gap_planes"].dtype == torch.uint8
        if logprobs != "f32":
            assert "target_codes" in c and c["target_codes"].dtype == (
                torch.uint8 if logprobs == "u8" else torch.uint16
            )
        expanded = expand_targets(c)
        assert set(expanded) == set(h)
        for key, value in h.items():
            if isinstance(value, torch.Tensor):
                assert expanded[key].dtype == value.dtype, key
                torch.testing.assert_close(expanded[key], value, rtol=0, atol=0, msg=key)
            else:
                assert expanded[key] == value, key


def test_losses_take_compact_batches(tmp_path):
    build_cache(tmp_path, fmt="parquet", mode="topk", logprobs="u8", vocab=300, num_units=2, seqs_per_unit=4)
    host, compact = both(tmp_path)
    gen = torch.Generator().manual_seed(0)
    for h, c in zip(host, compact):
        logits = torch.randn(*h["input_ids"].shape, 300, generator=gen)
        for name in ("forward_kl_tail", "renormalized_topk_kl"):
            fn = getattr(losses, name)
            torch.testing.assert_close(fn(logits, c), fn(logits, h), rtol=0, atol=0)
        assert "target_gap_planes" in c  # the caller's batch is left as it was


def test_compact_targets_refuse_read_time_changes(tmp_path):
    build_cache(tmp_path, fmt="parquet", mode="topk", num_units=1)
    with pytest.raises(ValueError, match="compact_targets"):
        KDCacheDataset(str(tmp_path), batch_size=2, compact_targets=True, top_k=2)
    with pytest.raises(ValueError, match="compact_targets"):
        KDCacheDataset(str(tmp_path), batch_size=2, compact_targets=True, temperature=2.0)


def test_sequences_with_different_plane_counts_share_a_batch():
    # each shard stores as many byte planes as its largest gap needs; a batch mixes shards, so the narrower rows are
    # padded with zero high planes, which decode to the same ids
    import numpy as np

    from kdcache.codec import encode_ids, gap_planes, values_to_planar
    from kdcache.read.collate import collate_sequences

    rng = np.random.default_rng(0)
    k, seqs, want = 4, [], []
    for vocab, length in ((200, 3), (70_000, 5)):
        ids = np.sort(np.stack([rng.choice(vocab, k, replace=False) for _ in range(length)]), axis=1)
        gaps = encode_ids(ids)
        planes = values_to_planar(gaps, gap_planes(gaps))
        seqs.append(
            {
                "seq_id": len(seqs),
                "input_ids": np.zeros(length, np.int32),
                "target_gap_planes": planes,
                "target_logprobs": np.full((length, k), -1.0, np.float32),
                "log_normalizers": np.zeros((length, 1), np.float32),
                "tail_logprobs": np.zeros((length, 1), np.float32),
                "entropy": np.zeros(length, np.float32),
            }
        )
        want.append(ids)
    assert seqs[0]["target_gap_planes"].shape[1] == k < seqs[1]["target_gap_planes"].shape[1]
    batch = {
        key: torch.from_numpy(v) for key, v in collate_sequences(seqs, k=k, num_temperatures=1, compact=True).items()
    }
    ids = expand_targets(batch)["target_ids"]
    assert torch.equal(ids[0, :3], torch.from_numpy(want[0])) and torch.equal(ids[1, :5], torch.from_numpy(want[1]))
    assert not ids[0, 3:].any()  # padding positions hold id 0, as in host batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compact_batches_expand_on_cuda(tmp_path):
    build_cache(tmp_path, fmt="parquet", mode="topk", logprobs="u16", vocab=70_000, num_units=2, seqs_per_unit=4)
    host, compact = both(tmp_path)
    for h, c in zip(host, compact):
        on_gpu = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in c.items()}
        expanded = expand_targets(on_gpu)
        torch.testing.assert_close(expanded["target_ids"].cpu(), h["target_ids"], rtol=0, atol=0)
        torch.testing.assert_close(expanded["target_logprobs"].cpu(), h["target_logprobs"], rtol=0, atol=0)
