"""Shard file formats. Nothing outside this package knows how a shard file is laid out.

    fmt = get_format("zarr")          # or "parquet"; the manifest's `shard_format` names the cache's format
    writer = fmt.ShardWriter(k=64, num_temperatures=2, codec=codec)
    writer.add(seq_id, input_ids, target_ids, target_logprobs, log_normalizers, tail_logprobs, entropy)
    data: bytes = writer.finish()     # one immutable object per work unit, named shards/<unit>-<attempt>{fmt.SUFFIX}
    shard = fmt.read_shard(data, k=64, num_temperatures=2, codec=codec)   # -> ShardData

Each format module has NAME, SUFFIX, ShardWriter (``add`` / ``finish() -> bytes``, ``num_sequences``,
``num_tokens``), ``read_shard(bytes, *, k, num_temperatures, codec) -> ShardData`` and
``read_shard_info(bytes) -> dict`` (counts and self-description from the footer / group metadata, without decoding
the targets). Formats import their heavy library (pyarrow, zarr) only when first asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kdcache.formats.shard import ShardData, split_sequences

__all__ = ["SHARD_FORMATS", "ShardData", "get_format", "split_sequences"]

SHARD_FORMATS = ("parquet", "zarr")


def get_format(name: str) -> ModuleType:
    """The format module for a `shard_format` name ("parquet" or "zarr"); ValueError names the unknown one."""
    if name not in SHARD_FORMATS:
        raise ValueError(f"unknown shard format {name!r} (known: {', '.join(SHARD_FORMATS)})")
    return importlib.import_module(f"kdcache.formats.{name}")
