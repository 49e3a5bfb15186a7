"""Parquet shards (format v2): write one immutable file per work unit, and read it back. pyarrow alone reads them.

One row per token, rows ordered by sequence then position; a row group holds whole sequences only (about
`row_group_tokens` tokens, rounded up to the end of a sequence). Columns (docs/FORMAT.md is the contract):

| column             | Parquet type             | encoding (writer's choice) | meaning                                |
|--------------------|--------------------------|----------------------------|----------------------------------------|
| seq_id             | INT64                    | dictionary (RLE)           | deterministic id of the sequence       |
| input_id           | INT32                    | BYTE_STREAM_SPLIT          | the input token at this position       |
| target_gaps        | FIXED_LEN_BYTE_ARRAY(Pk) | BYTE_STREAM_SPLIT          | k gap-coded ids in P byte planes       |
| target_codes       | FIXED_LEN_BYTE_ARRAY(Bk) | PLAIN (B=1) / BSS (B>1)    | k log-prob codes in B byte planes      |
| log_normalizer_{j} | FLOAT                    | BYTE_STREAM_SPLIT          | logsumexp(z / T_j) over the vocab      |
| tail_logprob_{j}   | FLOAT16                  | BYTE_STREAM_SPLIT          | log mass outside the k ids at T_j      |
| entropy            | FLOAT16                  | BYTE_STREAM_SPLIT          | entropy of the distribution at T=1     |
| sample_gaps        | LIST<INT32>              | BYTE_STREAM_SPLIT          | gap-coded unique sampled ids           |
| sample_counts      | BYTE_ARRAY               | DELTA_LENGTH_BYTE_ARRAY    | one uint8 draw count per sampled id    |
| sample_codes       | BYTE_ARRAY               | DELTA_LENGTH_BYTE_ARRAY    | one B-byte log-prob code per sampled id|

P (1..4) is the fewest bytes that hold the shard's largest gap, B the codec's bytes per log-prob (u8: 1, u16: 2,
f32: 4): both follow from the column's byte width. The target_* columns exist when k > 0 (topk, hybrid); the
sample_* columns when the cache was sampled. j indexes the manifest's `targets.temperatures` (j = 0 is T = 1). All
columns are zstd-compressed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.codec import (
    CodecParams,
    decode_planar_gaps,
    dequantize_logprobs,
    gap_planes,
    planar_to_values,
    values_to_planar,
)
from kdcache.formats.base import BufferedShardWriter, ShardData
from kdcache.formats.memory import pooled_empty
from kdcache.formats.rows import RaggedSamples, UnitRows, logprob_table, sequence_bounds, steps_from_planar

__all__ = [
    "NAME",
    "SUFFIX",
    "ShardWriter",
    "column_bytes",
    "decode_table",
    "read_rows",
    "read_shard",
    "read_shard_info",
    "read_table",
    "rows_from_table",
]

NAME = "parquet"
SUFFIX = ".parquet"
ROW_GROUP_TOKENS = 65536  # tokens per row group (rounded up to whole sequences)


def _fixed_binary(raw: np.ndarray) -> pa.Array:
    """[N, W] uint8 array -> FixedSizeBinaryArray of width W bytes, zero-copy."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), len(raw), [None, pa.py_buffer(raw)])


def _fixed_binary_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A FIXED_LEN_BYTE_ARRAY column -> [N, W] uint8 (zero-copy for a single chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    width = column.type.byte_width
    if len(column) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=(column.offset + len(column)) * width)
    return raw[column.offset * width :].reshape(len(column), width)


def _binary_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The concatenated bytes of a BYTE_ARRAY column's values, as uint8."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(col) == 0:
        return np.zeros(0, dtype=np.uint8)
    off = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    data = col.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return values[off[0] : off[-1]]


@dataclass
class ShardWriter(BufferedShardWriter):
    """Collects a unit's sequences and produces the Parquet file bytes (`add` ... `finish`).

    Args:
        k: top-k entries per token; num_temperatures: number of stored temperatures (index 0 is T = 1);
        num_samples: draws per token (0: no sample columns); compression_level: zstd level;
        codec: log-prob coding; metadata: JSON-able dict stored in the file's key-value metadata under "kdcache";
        row_group_tokens: tokens per row group (whole sequences, so a group can be a sequence longer).
    """

    row_group_tokens: int = ROW_GROUP_TOKENS

    def schema(self, planes: int = 1) -> pa.Schema:
        fields = [pa.field("seq_id", pa.int64()), pa.field("input_id", pa.int32())]
        if self.k > 0:
            fields += [
                pa.field("target_gaps", pa.binary(planes * self.k)),
                pa.field("target_codes", pa.binary(self.codec.code_bytes * self.k)),
            ]
        for j in range(self.num_temperatures):
            fields += [pa.field(f"log_normalizer_{j}", pa.float32()), pa.field(f"tail_logprob_{j}", pa.float16())]
        fields.append(pa.field("entropy", pa.float16()))
        if self.num_samples > 0:
            fields += [
                pa.field("sample_gaps", pa.list_(pa.int32())),
                pa.field("sample_counts", pa.binary()),
                pa.field("sample_codes", pa.binary()),
            ]
        described = {
            **self.metadata,
            "k": self.k,
            "num_samples": self.num_samples,
            "codec": self.codec.to_dict(),
            "gap_planes": planes,
        }
        return pa.schema(fields, metadata={"kdcache": json.dumps(described, sort_keys=True)})

    def _table(self, a: dict[str, np.ndarray], lo: int, hi: int, planes: int, schema: pa.Schema) -> pa.Table:
        """Token rows [lo, hi) as an Arrow table of `schema`."""
        n = hi - lo
        seq_ids = np.repeat(a["seq_ids"], a["seq_lengths"])[lo:hi]
        columns: dict[str, pa.Array] = {"seq_id": pa.array(seq_ids), "input_id": pa.array(a["input_ids"][lo:hi])}
        if self.k > 0:
            columns["target_gaps"] = _fixed_binary(values_to_planar(a["gaps"][lo:hi], planes))
            codes = a["codes"][lo:hi]
            columns["target_codes"] = _fixed_binary(values_to_planar(codes, self.codec.code_bytes))
        for j in range(self.num_temperatures):
            columns[f"log_normalizer_{j}"] = pa.array(np.ascontiguousarray(a["log_normalizers"][lo:hi, j]))
            columns[f"tail_logprob_{j}"] = pa.array(a["tail_logprobs"][lo:hi, j].astype(np.float16))
        columns["entropy"] = pa.array(a["entropy"][lo:hi].astype(np.float16))
        if self.num_samples > 0:
            offsets = np.concatenate([[0], np.cumsum(a["sample_lengths"], dtype=np.int64)])
            e0, e1 = int(offsets[lo]), int(offsets[hi])
            local = (offsets[lo : hi + 1] - e0).astype(np.int32)
            code_bytes = self.codec.code_bytes
            columns["sample_gaps"] = pa.ListArray.from_arrays(
                pa.array(local), pa.array(a["sample_gaps"][e0:e1].view(np.int32))
            )
            columns["sample_counts"] = pa.BinaryArray.from_buffers(
                pa.binary(), n, [None, pa.py_buffer(local), pa.py_buffer(a["sample_counts"][e0:e1].tobytes())]
            )
            codes = np.ascontiguousarray(a["sample_codes"][e0:e1]).astype(self.codec.code_dtype, copy=False)
            columns["sample_codes"] = pa.BinaryArray.from_buffers(
                pa.binary(), n, [None, pa.py_buffer(local * code_bytes), pa.py_buffer(codes.tobytes())]
            )
        return pa.Table.from_pydict(columns, schema=schema)

    def finish(self) -> bytes:
        """The complete Parquet file as bytes (one row group per ~row_group_tokens, whole sequences only)."""
        a = self._buffer.arrays()
        planes = gap_planes(a["gaps"])
        schema = self.schema(planes)
        float_cols = [n for n in schema.names if n.startswith(("log_normalizer_", "tail_logprob_")) or n == "entropy"]
        encodings = {"input_id": "BYTE_STREAM_SPLIT", **{c: "BYTE_STREAM_SPLIT" for c in float_cols}}
        if self.k > 0:
            encodings["target_gaps"] = "BYTE_STREAM_SPLIT"
            encodings["target_codes"] = "BYTE_STREAM_SPLIT" if self.codec.code_bytes > 1 else "PLAIN"
        if self.num_samples > 0:
            encodings.update(
                {
                    "sample_gaps.list.element": "BYTE_STREAM_SPLIT",
                    "sample_counts": "DELTA_LENGTH_BYTE_ARRAY",
                    "sample_codes": "DELTA_LENGTH_BYTE_ARRAY",
                }
            )
        sink = io.BytesIO()
        with pq.ParquetWriter(
            sink,
            schema,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=["seq_id"],
            column_encoding=encodings,
            write_statistics=["seq_id"],
        ) as writer:
            bounds = _row_group_bounds(a["seq_lengths"], self.row_group_tokens)
            for lo, hi in bounds:
                writer.write_table(self._table(a, lo, hi, planes, schema), row_group_size=max(hi - lo, 1))
        return sink.getvalue()


def _row_group_bounds(seq_lengths: np.ndarray, row_group_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of the row groups: whole sequences, each group closed once it reaches row_group_tokens."""
    bounds, lo, size = [], 0, 0
    for length in seq_lengths.tolist():
        size += length
        if size >= row_group_tokens:
            bounds.append((lo, lo + size))
            lo, size = lo + size, 0
    if size or not bounds:
        bounds.append((lo, lo + size))
    return bounds


def _source(source: bytes | memoryview | BinaryIO) -> Any:
    """What pyarrow reads: a zero-copy reader over bytes-like data, or the seekable binary file itself."""
    return pa.BufferReader(source) if isinstance(source, (bytes, bytearray, memoryview)) else source


def read_table(source: bytes | memoryview | BinaryIO, columns: list[str] | None = None) -> pa.Table:
    """A shard's Arrow table (decompressed, not decoded): the one way kdcache reads a Parquet shard.

    `ParquetFile.read` without Arrow's thread pools, not `pq.read_table`: that goes through the Arrow dataset
    scanner, whose thread pools are a fork hazard in DataLoader workers (hangs, and aborts at interpreter exit), and
    imports pyarrow.dataset and pandas with it (~1.5 s) in every fresh worker. Parallelism comes from the reader's
    threads instead (Arrow releases the GIL while it reads).
    """
    return pq.ParquetFile(_source(source)).read(columns=columns, use_threads=False)


def _samples(table: pa.Table, codec: CodecParams) -> RaggedSamples | None:
    """The table's sampled targets, ragged as stored (None when the shard has no sample columns)."""
    if "sample_gaps" not in table.column_names:
        return None
    gaps_col = table.column("sample_gaps").combine_chunks()
    offsets = gaps_col.offsets.to_numpy().astype(np.int64)
    gaps = gaps_col.values.to_numpy(zero_copy_only=False).view(np.uint32)[offsets[0] : offsets[-1]]
    return RaggedSamples(
        offsets=offsets - offsets[0],
        gaps=gaps,
        counts=_binary_values(table.column("sample_counts")),
        codes=_binary_values(table.column("sample_codes")).view(codec.code_dtype),
        codec=codec,
    )


def _target_planes(table: pa.Table, k: int, codec: CodecParams) -> tuple[np.ndarray, np.ndarray]:
    """The [N, P * k] planar gap bytes and the [N, k] log-prob codes of a table's target columns (zero-copy)."""
    gaps_raw = _fixed_binary_to_numpy(table.column("target_gaps"))
    codes_raw = _fixed_binary_to_numpy(table.column("target_codes"))
    if gaps_raw.shape[1] % k or codes_raw.shape[1] != codec.code_bytes * k:
        raise ValueError(
            f"target columns are {gaps_raw.shape[1]} / {codes_raw.shape[1]} bytes wide; expected multiples of "
            f"k={k} with {codec.code_bytes}-byte codes ({codec.logprobs})"
        )
    return gaps_raw, planar_to_values(codes_raw, k, codec.code_dtype)


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column as numpy (zero-copy for one chunk without nulls)."""
    col = table.column(name)
    return col.chunk(0).to_numpy(zero_copy_only=False) if col.num_chunks == 1 else col.to_numpy()


def _per_temperature(table: pa.Table, prefix: str, num_temperatures: int) -> np.ndarray:
    """[N, nT] float32 (pooled) from the columns `{prefix}_0`, `{prefix}_1`, ..."""
    out = pooled_empty((table.num_rows, num_temperatures), np.float32)
    for j in range(num_temperatures):
        out[:, j] = _numpy(table, f"{prefix}_{j}")
    return out


def read_shard(
    source: bytes | memoryview | BinaryIO, *, k: int, num_temperatures: int, codec: CodecParams = CodecParams()
) -> ShardData:
    """Decode a whole shard file (bytes or a seekable binary file)."""
    return decode_table(read_table(source), k=k, num_temperatures=num_temperatures, codec=codec)


def read_rows(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    vocab_size: int,
    planar: bool = False,
) -> UnitRows:
    """A shard's rows, compact for batching (`kdcache.formats.rows`); see `rows_from_table`."""
    return rows_from_table(
        read_table(source), k=k, num_temperatures=num_temperatures, codec=codec, vocab_size=vocab_size, planar=planar
    )


def rows_from_table(
    table: pa.Table, *, k: int, num_temperatures: int, codec: CodecParams, vocab_size: int, planar: bool = False
) -> UnitRows:
    """Compact rows of a shard's table (`read_table`): id steps in uint16 when `vocab_size` (the teacher's padded
    vocabulary) allows, else int32; with `planar`, the stored gap bytes as they are (zero-copy). Raises ValueError
    for unexpected columns."""
    n = table.num_rows
    starts, lengths, seq_ids = sequence_bounds(_numpy(table, "seq_id"))
    if k > 0:
        gaps_raw, codes = _target_planes(table, k, codec)
        ids = gaps_raw if planar else steps_from_planar(gaps_raw, k, vocab_size)
    else:
        ids, codes = np.zeros((n, 0), np.uint16), np.zeros((n, 0), codec.code_dtype)
    are_codes = logprob_table(codec) is not None
    return UnitRows(
        starts=starts,
        lengths=lengths,
        seq_ids=seq_ids,
        input_ids=_numpy(table, "input_id").astype(np.int32, copy=False),
        target_ids=ids,
        ids_key="target_gap_planes" if planar else "target_steps",
        target_values=codes if are_codes else dequantize_logprobs(codes, codec),
        values_are_codes=are_codes,
        log_normalizers=_per_temperature(table, "log_normalizer", num_temperatures),
        tail_logprobs=_per_temperature(table, "tail_logprob", num_temperatures),
        entropy=_numpy(table, "entropy").astype(np.float32, copy=False),
        samples=_samples(table, codec),
    )


def read_shard_info(source: bytes | memoryview | BinaryIO) -> dict[str, Any]:
    """Counts and self-description from the footer and the seq_id column only (no target is decompressed).

    Returns {"num_tokens", "num_sequences", "metadata"}; raises for a file pyarrow cannot read.
    """
    pf = pq.ParquetFile(_source(source))
    raw = (pf.schema_arrow.metadata or {}).get(b"kdcache", b"{}")
    seq = pf.read(columns=["seq_id"], use_threads=False).column("seq_id").to_numpy()
    runs = int(np.count_nonzero(np.diff(seq))) + 1 if len(seq) else 0
    return {"num_tokens": pf.metadata.num_rows, "num_sequences": runs, "metadata": json.loads(raw)}


def column_bytes(source: bytes | memoryview | BinaryIO) -> dict[str, int]:
    """Compressed bytes of each top-level column of a shard, summed over row groups (only the footer is read).

    Returns:
        ``{column: bytes}`` in schema order; nested leaves such as ``sample_gaps.list.element`` are summed into their
        top-level column.
    """
    metadata = pq.ParquetFile(_source(source)).metadata
    sizes: dict[str, int] = {}
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            name = chunk.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + int(chunk.total_compressed_size)
    return sizes


def decode_table(table: pa.Table, *, k: int, num_temperatures: int, codec: CodecParams = CodecParams()) -> ShardData:
    """Decode token rows already read into an Arrow table (a whole file, some row groups, or a row slice)."""
    n = table.num_rows
    if k > 0:
        gaps_raw, codes = _target_planes(table, k, codec)
        target_ids = decode_planar_gaps(gaps_raw, k)
        target_logprobs = dequantize_logprobs(codes, codec)
    else:
        target_ids, target_logprobs = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    ragged = _samples(table, codec)
    samples = ragged.padded(0, n) if ragged is not None else (None, None, None)
    return ShardData(
        seq_ids=_numpy(table, "seq_id").astype(np.int64, copy=False),
        input_ids=_numpy(table, "input_id").astype(np.int32, copy=False),
        target_ids=target_ids,
        target_logprobs=target_logprobs,
        log_normalizers=_per_temperature(table, "log_normalizer", num_temperatures),
        tail_logprobs=_per_temperature(table, "tail_logprob", num_temperatures),
        entropy=_numpy(table, "entropy").astype(np.float32, copy=False),
        sample_ids=samples[0],
        sample_counts=samples[1],
        sample_logprobs=samples[2],
    )
