"""A FakeTeacher cache writer for tests: real shards and manifest, targets from seeded random logits, no model, no Ray.

manifest = write_fake_cache("memory://c1", num_units=3, seqs_per_unit=5, k=8, vocab=64)
logits = fake_logits(seq_id, length, vocab)   # the dense teacher logits behind a cached sequence
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np
import torch

from kdcache.capture.targets import select_topk
from kdcache.codec import CodecParams
from kdcache.formats.parquet import SUFFIX, ShardWriter
from kdcache.manifest import FORMAT_VERSION, INDEX_KEY, build_manifest, dumps, shard_key
from kdcache.store import Store

__all__ = ["fake_logits", "write_fake_cache"]


def fake_logits(seq_id: int, length: int, vocab: int) -> torch.Tensor:
    """[length, vocab] float32 logits, a pure function of seq_id (LLM-like: a few large logits per row)."""
    g = torch.Generator().manual_seed(seq_id % (2**31))
    return torch.randn(length, vocab, generator=g) * 3.0


def write_fake_cache(
    uri: str,
    *,
    num_units: int = 3,
    seqs_per_unit: int | list[int] = 4,
    k: int = 8,
    vocab: int = 64,
    tokenizer_vocab: int | None = None,
    temperatures: tuple[float, ...] = (1.0, 2.0),
    min_len: int = 3,
    max_len: int = 12,
    seed: int = 0,
    tokenizer_hash: str = "fake-tokenizer",
    masked: float = 0.0,
) -> dict[str, Any]:
    """Write a complete cache (shards + index.json) of random sequences; returns the manifest.

    `masked`: the probability that a position has no target (a chat's prompt, say); 0 writes no target masks."""
    store = Store(uri)
    rng = np.random.default_rng(seed)
    per_unit = [seqs_per_unit] * num_units if isinstance(seqs_per_unit, int) else list(seqs_per_unit)
    inputs = {
        "format_version": FORMAT_VERSION,
        "teacher": {
            "model": "fake",
            "revision": None,
            "dtype": "float32",
            "padded_vocab_size": vocab,
            "model_type": "fake",
        },
        "tokenizer": {"name": "fake", "hash": tokenizer_hash, "vocab_size": tokenizer_vocab or vocab},
        "targets": {"mode": "topk", "k": k, "temperatures": list(temperatures)},
        "codec": CodecParams().to_dict(),
        "windowing": {"max_length": max_len, "min_length": min_len, "add_eos": True},
        "data": {"source": "fake"},
        "shard_format": "parquet",
    }
    fingerprint = hashlib.sha256(repr(sorted(inputs.items())).encode()).hexdigest()
    units = []
    next_id = 1000 + seed * 100_000
    for u, n in enumerate(per_unit):
        writer = ShardWriter(k=k, num_temperatures=len(temperatures), vocab_size=vocab)
        for _ in range(n):
            length = int(rng.integers(min_len, max_len + 1))
            seq_id = next_id
            next_id += 1
            mask = rng.random(length) >= masked if masked else None
            logits = fake_logits(seq_id, length, vocab)
            t = select_topk(logits if mask is None else logits[torch.from_numpy(mask)], k, list(temperatures))
            ids = rng.integers(0, vocab, size=length).astype(np.int32)
            writer.add(seq_id, ids, t, target_mask=mask)
        data = writer.finish()
        unit_id = f"unit{u:04d}"
        path = shard_key(unit_id, "a0", SUFFIX)
        store.write_bytes(path, data)
        units.append(
            {
                "unit_id": unit_id,
                "path": path,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "crc32": zlib.crc32(data),
                "num_sequences": writer.num_sequences,
                "num_tokens": writer.num_tokens,
                "num_target_tokens": writer.num_target_tokens,
            }
        )
    manifest = build_manifest(
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        units=units,
        shard_format="parquet",
        shard_suffix=SUFFIX,
    )
    store.write_bytes(INDEX_KEY, dumps(manifest))
    return manifest
