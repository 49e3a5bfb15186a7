"""Shard file formats: the only code that knows how a shard file is laid out.

    fmt = get_format("zarr")          # or "parquet"; the manifest's `shard_format` names the cache's format
    writer = fmt.ShardWriter(k=64, num_temperatures=2, codec=codec)
    writer.add(seq_id, input_ids, head)          # head: `kdcache.formats.base.HeadRows` (e.g. a TokenTargets)
    writer.add(seq_id, input_ids, head, target_mask=mask)  # targets at the True positions only (head: those rows)
    data: bytes = writer.finish()     # one immutable object per work unit, named shards/<unit>-<attempt>{fmt.SUFFIX}
    shard = fmt.read_shard(data, k=64, num_temperatures=2, codec=codec, counts=counts)   # -> base.ShardData
    rows = fmt.read_rows(data, k=64, num_temperatures=2, codec=codec, vocab_size=V, counts=counts)  # -> UnitRows

`counts` (`base.ShardCounts`: tokens, sequences, target positions, as the manifest declares them) bounds what a read
may allocate and decompress; readers of a cache always pass it (and `num_samples`), tools reading a lone file may
leave it out.

Each format module has NAME, SUFFIX, ShardWriter (``add`` / ``encode_sequence`` + ``add_encoded`` / ``finish() ->
bytes``, ``num_sequences``, ``num_tokens``), ``read_shard`` (every column decoded: `ShardData`), ``read_rows``
(compact rows for batching: `UnitRows`), ``read_shard_info(bytes) -> dict`` (counts and self-description without
decoding the targets) and ``column_bytes(bytes) -> {column: stored bytes}``. What the formats share is in `base`
(encoding, `ShardData`), `rows` (`UnitRows`) and `memory` (Arrow-pool arrays). Formats import their heavy library
(pyarrow, zarr) only when first asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SHARD_FORMATS", "get_format"]

SHARD_FORMATS = ("parquet", "zarr")


def get_format(name: str) -> ModuleType:
    """The format module for a `shard_format` name ("parquet" or "zarr"); ValueError names the unknown one."""
    if name not in SHARD_FORMATS:
        raise ValueError(f"unknown shard format {name!r} (known: {', '.join(SHARD_FORMATS)})")
    return importlib.import_module(f"kdcache.formats.{name}")
