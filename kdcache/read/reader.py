"""Reading a cache back: `open_cache(uri)` -> `CacheReader` (manifest, per-unit decode, per-sequence iteration).

    cache = kdcache.open_cache("/data/kd/llama-top64")
    for seq in cache.iter_sequences():
        seq["input_ids"]        # [T] int32
        seq["target_ids"]       # [T, k] int64, ascending
        seq["target_logprobs"]  # [T, k] float32, teacher log-softmax at T=1
        seq["tail_logprob"]     # [T] float32, log of the mass outside the k ids
        seq["loss_mask"]        # [T] bool, True where the position carries targets (every position, unless the
                                # cache was written with target masks, e.g. a chat's prompt positions)
        seq["prompt_id"]        # generated responses only (docs/GENERATE.md): the source record's id, and
        seq["sample_index"]     # which of its responses this is

Positions without a target hold id -1, log-prob -inf and tail -inf (no mass), normalizers and entropy 0, no samples.

The reader reads `index.json` and the shards it names, never a listing; every shard is checked against the size and
checksum recorded at commit (crc32; sha256 for caches that lack it), and a mismatch raises `CorruptShardError` naming
the shard. The manifest is checked first (`kdcache.manifest.validate_manifest`), a local shard's size before any
memory is sized by it, and a shard's contents against the counts its entry declares before they are decompressed
(`kdcache.formats`): a hostile cache is refused with a message, not read into unbounded memory.

Remote caches (s3://, gs://, memory://, ...) can keep the shards they fetch on local disk:
`open_cache(uri, local_cache_dir="/nvme/kd", local_cache_bytes=100 * 2**30)` serves a shard from there when its
local copy passes the same size and checksum check, and fetches (and stores) it otherwise; least recently used
shards are evicted above the limit (`kdcache.read.localcache`). Caches on a local path are read in place, not copied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from kdcache.codec import CodecParams
from kdcache.errors import CacheMismatchError, CorruptShardError, KdcacheError
from kdcache.formats import get_format
from kdcache.formats.base import ShardCounts, ShardData, split_sequences
from kdcache.formats.memory import read_pooled
from kdcache.formats.rows import UnitRows
from kdcache.manifest import INDEX_KEY, read_manifest, shard_checksum_error
from kdcache.read.localcache import LocalShardCache
from kdcache.store import Store

__all__ = ["CacheReader", "open_cache"]


class CacheReader:
    """A complete cache, opened through its manifest.

    Args:
        uri: the cache root URL; storage_options: fsspec options.
        local_cache_dir: a local directory that keeps fetched shards of a remote cache (ignored for a cache on a
            local path, which is read in place); share it between the workers and ranks of a node.
        local_cache_bytes: its size limit in bytes (required with `local_cache_dir`).
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        local_cache_dir: str | None = None,
        local_cache_bytes: int | None = None,
    ):
        if (local_cache_dir is None) != (local_cache_bytes is None):
            raise ValueError("give local_cache_dir together with local_cache_bytes (its size limit in bytes)")
        self.store = Store(uri, storage_options)
        self.local_cache: LocalShardCache | None = None
        if local_cache_dir is not None and not self.store.is_local:
            self.local_cache = LocalShardCache(local_cache_dir, int(local_cache_bytes))
        manifest = read_manifest(self.store)
        if manifest is None:
            raise KdcacheError(
                f"{self.store.url(INDEX_KEY)}: no manifest; the cache is missing or its job has not finished"
            )
        self.manifest: dict[str, Any] = manifest
        inputs = manifest["fingerprint_inputs"]
        self.k: int = inputs["targets"]["k"]
        self.mode: str = inputs["targets"]["mode"]
        self.num_samples: int = inputs["targets"].get("samples", 0) if self.mode != "topk" else 0
        self.temperatures: list[float] = list(inputs["targets"]["temperatures"])
        self.vocab: int = int(inputs["teacher"]["padded_vocab_size"])  # every id is below it
        try:
            self.codec = CodecParams.from_dict(inputs["codec"])
            self.format = get_format(manifest["shard_format"])  # the module that reads this cache's shards
        except ValueError as exc:
            raise CacheMismatchError(f"{self.store.url(INDEX_KEY)}: {exc}") from None
        self.units: list[dict[str, Any]] = manifest["units"]
        # the units' sums (validated), not stats' copies of them: what the shards are checked against
        self.num_sequences: int = sum(u["num_sequences"] for u in self.units)
        self.num_tokens: int = sum(u["num_tokens"] for u in self.units)
        self.num_target_tokens: int = sum(u["num_target_tokens"] for u in self.units)
        self._sized: set[int] = set()  # units whose shard size was checked (`check_unit_sizes`)

    def _layout(self, unit: dict[str, Any]) -> dict[str, Any]:
        """What the format readers check a unit's shard against: the cache's layout and the unit's counts."""
        return {
            "k": self.k,
            "num_temperatures": len(self.temperatures),
            "codec": self.codec,
            "num_samples": self.num_samples,
            "counts": ShardCounts(unit["num_tokens"], unit["num_sequences"], unit["num_target_tokens"]),
        }

    def check_unit_sizes(self, indices: Any) -> None:
        """Check that the shards of these units (manifest indices) have the byte sizes their entries record (once
        per unit and process): what a reader does before it sizes anything (an epoch's order, say) by the units'
        counts, which the manifest validates against those sizes. Raises `CorruptShardError` naming the shard."""
        for index in indices:
            index = int(index)
            if index in self._sized:
                continue
            unit = self.units[index]
            url = self.store.url(unit["path"])
            local = self.local_cache.size_of(unit) if self.local_cache is not None else None
            try:
                size = local if local is not None else self.store.size(unit["path"])
            except FileNotFoundError:
                raise CorruptShardError(f"{url}: shard of unit {unit['unit_id']} is missing") from None
            except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
                raise CorruptShardError(f"{url}: cannot read the shard of unit {unit['unit_id']} ({exc})") from None
            if size != unit["bytes"]:
                raise CorruptShardError(f"{url}: shard has {size} bytes, the manifest records {unit['bytes']}")
            self._sized.add(index)

    def read_unit_bytes(self, unit: dict[str, Any]) -> bytes | memoryview:
        """The shard's bytes (bytes-like), checked against its recorded size and checksum (from the local cache when it
        holds a valid copy; a fetched shard is added to it)."""
        if self.local_cache is not None:
            data = self.local_cache.get(unit)
            if data is None:
                data = self._fetch_unit_bytes(unit)
                self.local_cache.put(unit["sha256"], data)
            return data
        return self._fetch_unit_bytes(unit)

    def _fetch_unit_bytes(self, unit: dict[str, Any]) -> bytes | memoryview:
        url = self.store.url(unit["path"])
        try:
            if self.store.is_local:  # into pooled memory: no page faults for a buffer of this size again
                with self.store.open(unit["path"], "rb") as f:
                    size = _file_size(f)
                    if size is not None and size != unit["bytes"]:  # before a buffer of the recorded size exists
                        raise CorruptShardError(f"{url}: shard has {size} bytes, the manifest records {unit['bytes']}")
                    data = read_pooled(f, int(unit["bytes"]))
            else:
                data = self.store.read_bytes(unit["path"])
        except FileNotFoundError:
            raise CorruptShardError(f"{url}: shard of unit {unit['unit_id']} is missing") from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise CorruptShardError(f"{url}: cannot read the shard of unit {unit['unit_id']} ({exc})") from None
        problem = shard_checksum_error(unit, data)
        if problem:
            raise CorruptShardError(f"{url}: {problem}")
        return data

    def read_unit(self, unit: dict[str, Any]) -> ShardData:
        """Decode one unit's shard (checked)."""
        data = self.read_unit_bytes(unit)
        try:
            return self.format.read_shard(data, **self._layout(unit))
        except Exception as exc:  # checksum passed but decoding failed: an incompatible or hostile writer
            raise CorruptShardError(f"{self.store.url(unit['path'])}: cannot decode shard: {exc}") from None

    def read_unit_rows(self, unit: dict[str, Any], *, planar: bool = False, token_text: bool = False) -> UnitRows:
        """One unit's rows, compact for batching (`kdcache.formats.rows`): fetched and checked like `read_unit`.
        `planar` keeps the gaps as planar bytes (for compact batches); `token_text` reads the text behind the
        tokens too (caches captured with `targets.cross_tokenizer`)."""
        url = self.store.url(unit["path"])
        data = self.read_unit_bytes(unit)
        try:
            layout = self._layout(unit) | ({"token_text": True} if token_text else {})
            return self.format.read_rows(data, vocab_size=self.vocab, planar=planar, **layout)
        except Exception as exc:  # checksum passed but reading failed: an incompatible or hostile writer
            raise CorruptShardError(f"{url}: cannot read shard: {exc}") from None

    def iter_sequences(self) -> Iterator[dict[str, Any]]:
        """Every sequence of the cache in manifest order, as a dict of numpy arrays (see module docstring)."""
        for unit in self.units:
            data = self.read_unit(unit)
            for seq_id, rows in split_sequences(data):
                yield sequence_dict(seq_id, data, rows)


def _file_size(f: Any) -> int | None:
    """The size of an open local file (None when it has no descriptor)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None


def sequence_dict(seq_id: int, data: ShardData, rows: slice) -> dict[str, Any]:
    """One sequence's arrays out of a decoded shard (sampled caches add sample_ids/_counts/_logprobs [T, m]; a shard
    with sequence fields adds each, e.g. prompt_id, as a numpy scalar)."""
    samples = {name: values[rows.start] for name, values in (data.sequence_fields or {}).items()}
    if data.sample_ids is not None:
        samples |= {
            "sample_ids": data.sample_ids[rows],
            "sample_counts": data.sample_counts[rows],
            "sample_logprobs": data.sample_logprobs[rows],
        }
    return samples | {
        "seq_id": np.int64(seq_id),
        "input_ids": data.input_ids[rows],
        "loss_mask": data.target_mask[rows],
        "target_ids": data.target_ids[rows],
        "target_logprobs": data.target_logprobs[rows],
        "tail_logprob": data.tail_logprobs[rows, 0],
        "log_normalizers": data.log_normalizers[rows],
        "tail_logprobs": data.tail_logprobs[rows],
        "entropy": data.entropy[rows],
    }


def open_cache(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    local_cache_dir: str | None = None,
    local_cache_bytes: int | None = None,
) -> CacheReader:
    """Open a complete cache by URL (local path, s3://, gs://, memory://); see `CacheReader` for the local cache."""
    return CacheReader(uri, storage_options, local_cache_dir=local_cache_dir, local_cache_bytes=local_cache_bytes)
