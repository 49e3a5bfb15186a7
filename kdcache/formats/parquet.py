"""Parquet shards (format v1): write one immutable file per work unit, and read it back.

One row per token, rows ordered by sequence then position; a row group never splits a sequence. Columns
(see docs/FORMAT.md for the contract):

| column             | Parquet type                 | encoding          | meaning                                        |
|--------------------|------------------------------|-------------------|------------------------------------------------|
| seq_id             | INT64                        | dictionary (RLE)  | deterministic id of the sequence (window)      |
| input_id           | INT32                        | plain             | the input token at this position               |
| target_gaps        | FIXED_LEN_BYTE_ARRAY(4k)     | BYTE_STREAM_SPLIT | k gap-coded ids, little-endian uint32          |
| target_codes       | FIXED_LEN_BYTE_ARRAY(k)      | plain             | k uint8 quantized log-probs, aligned with ids  |
| log_normalizer_{j} | FLOAT                        | BYTE_STREAM_SPLIT | logsumexp(z / T_j) over the teacher's vocab    |
| tail_logprob_{j}   | FLOAT                        | BYTE_STREAM_SPLIT | log mass outside the k ids at T_j              |
| entropy            | FLOAT                        | BYTE_STREAM_SPLIT | entropy of the teacher distribution at T=1     |
| sample_gaps        | LIST<INT32>                  | plain             | sample/hybrid: gap-coded unique sampled ids    |
| sample_counts      | BYTE_ARRAY                   | plain             | sample/hybrid: one uint8 draw count per id     |
| sample_codes       | BYTE_ARRAY                   | plain             | sample/hybrid: one uint8 log-prob code per id  |

The target_* columns exist when k > 0 (topk, hybrid); the sample_* columns when the cache was sampled.
j indexes the manifest's `targets.temperatures` (j = 0 is T = 1). All columns are zstd-compressed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.codec import CodecParams, decode_ids, dequantize_logprobs, encode_ids, quantize_logprobs, sort_targets

__all__ = ["SHARD_SUFFIX", "ShardData", "ShardWriter", "read_shard", "split_sequences"]

SHARD_SUFFIX = ".parquet"
ROW_GROUP_TOKENS = 65536  # tokens per row group (rounded up to whole sequences)


def _fixed_binary(values: np.ndarray) -> pa.Array:
    """[N, W] uint8-viewable array -> FixedSizeBinaryArray of width W bytes, zero-copy."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), len(raw), [None, pa.py_buffer(raw)])


def _fixed_binary_to_numpy(column: pa.ChunkedArray | pa.Array, width: int, dtype: np.dtype) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    buf = arr.buffers()[1]
    raw = np.frombuffer(buf, dtype=np.uint8, count=(arr.offset + len(arr)) * width)[arr.offset * width :]
    return raw.view(dtype).reshape(len(arr), -1)


@dataclass
class ShardWriter:
    """Collects a unit's sequences and produces the Parquet file bytes (`add` ... `finish`).

    Args:
        k: top-k entries per token; num_temperatures: number of stored temperatures (index 0 is T = 1).
        metadata: JSON-able dict stored in the file's key-value metadata under "kdcache" (self-description).
    """

    k: int
    num_temperatures: int
    num_samples: int = 0
    compression_level: int = 3
    codec: CodecParams = field(default_factory=CodecParams)
    metadata: dict[str, Any] = field(default_factory=dict)
    row_group_tokens: int = ROW_GROUP_TOKENS
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_tokens: int = 0
    _groups: list[pa.Table] = field(default_factory=list)
    num_sequences: int = 0
    num_tokens: int = 0

    def schema(self) -> pa.Schema:
        fields = [pa.field("seq_id", pa.int64()), pa.field("input_id", pa.int32())]
        if self.k > 0:
            fields += [pa.field("target_gaps", pa.binary(4 * self.k)), pa.field("target_codes", pa.binary(self.k))]
        for j in range(self.num_temperatures):
            fields += [pa.field(f"log_normalizer_{j}", pa.float32()), pa.field(f"tail_logprob_{j}", pa.float32())]
        fields.append(pa.field("entropy", pa.float32()))
        if self.num_samples > 0:
            fields += [
                pa.field("sample_gaps", pa.list_(pa.int32())),
                pa.field("sample_counts", pa.binary()),
                pa.field("sample_codes", pa.binary()),
            ]
        described = {**self.metadata, "k": self.k, "num_samples": self.num_samples, "codec": self.codec.to_dict()}
        meta = {"kdcache": json.dumps(described, sort_keys=True)}
        return pa.schema(fields, metadata=meta)

    def add(
        self,
        seq_id: int,
        input_ids: np.ndarray,
        target_ids: np.ndarray,
        target_logprobs: np.ndarray,
        log_normalizers: np.ndarray,
        tail_logprobs: np.ndarray,
        entropy: np.ndarray,
        sample_ids: np.ndarray | None = None,
        sample_counts: np.ndarray | None = None,
        sample_logprobs: np.ndarray | None = None,
    ) -> None:
        """Add one sequence. Shapes: input_ids [T]; target_ids, target_logprobs [T, k]; log_normalizers,
        tail_logprobs [T, nT]; entropy [T]; sample_* [T, m] padded with count 0 (sampled caches only).
        Ids need not be sorted (they are sorted here)."""
        t = len(input_ids)
        if target_ids.shape != (t, self.k) or target_logprobs.shape != (t, self.k):
            raise ValueError(f"sequence {seq_id}: targets must be [{t}, {self.k}], got {target_ids.shape}")
        if log_normalizers.shape != (t, self.num_temperatures) or tail_logprobs.shape != (t, self.num_temperatures):
            raise ValueError(f"sequence {seq_id}: normalizers/tails must be [{t}, {self.num_temperatures}]")
        ids, lps = sort_targets(np.asarray(target_ids), np.asarray(target_logprobs))
        columns = {
            "seq_id": pa.array(np.full(t, seq_id, dtype=np.int64)),
            "input_id": pa.array(np.asarray(input_ids, dtype=np.int32)),
        }
        if self.k > 0:
            columns["target_gaps"] = _fixed_binary(encode_ids(ids).astype("<u4"))
            columns["target_codes"] = _fixed_binary(quantize_logprobs(lps, self.codec))
        for j in range(self.num_temperatures):
            columns[f"log_normalizer_{j}"] = pa.array(np.asarray(log_normalizers[:, j], dtype=np.float32))
            columns[f"tail_logprob_{j}"] = pa.array(np.asarray(tail_logprobs[:, j], dtype=np.float32))
        columns["entropy"] = pa.array(np.asarray(entropy, dtype=np.float32))
        if self.num_samples > 0:
            if sample_ids is None or sample_counts is None or sample_logprobs is None:
                raise ValueError(f"sequence {seq_id}: a sampled shard needs sample_ids, sample_counts, sample_logprobs")
            columns.update(_encode_samples(sample_ids, sample_counts, sample_logprobs, self.codec))
        self._pending.append(pa.Table.from_pydict(columns, schema=self.schema()))
        self._pending_tokens += t
        self.num_sequences += 1
        self.num_tokens += t
        if self._pending_tokens >= self.row_group_tokens:
            self._close_group()

    def _close_group(self) -> None:
        if self._pending:
            self._groups.append(pa.concat_tables(self._pending))
            self._pending, self._pending_tokens = [], 0

    def finish(self) -> bytes:
        """The complete Parquet file as bytes (one row group per ~row_group_tokens, whole sequences only)."""
        self._close_group()
        schema = self.schema()
        float_cols = [n for n in schema.names if n.startswith(("log_normalizer_", "tail_logprob_")) or n == "entropy"]
        sink = io.BytesIO()
        with pq.ParquetWriter(
            sink,
            schema,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=["seq_id"],
            column_encoding={"target_gaps": "BYTE_STREAM_SPLIT", **{c: "BYTE_STREAM_SPLIT" for c in float_cols}},
            write_statistics=["seq_id"],
        ) as writer:
            for group in self._groups or [schema.empty_table()]:
                writer.write_table(group, row_group_size=max(len(group), 1))
        return sink.getvalue()


def _encode_samples(ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray, codec: CodecParams) -> dict:
    """Ragged per-token sample columns from padded [T, m] arrays (entries with count 0 are padding)."""
    valid = np.asarray(counts) > 0
    lengths = valid.sum(axis=1)
    order = np.argsort(np.where(valid, ids, np.iinfo(np.int64).max), axis=1, kind="stable")  # valid ids ascending
    ids_s = np.take_along_axis(np.asarray(ids, dtype=np.int64), order, axis=1)
    counts_s = np.take_along_axis(np.asarray(counts), order, axis=1)
    lps_s = np.take_along_axis(np.asarray(logprobs, dtype=np.float32), order, axis=1)
    keep = np.arange(ids_s.shape[1])[None, :] < lengths[:, None]
    gaps = np.where(keep, np.concatenate([ids_s[:, :1], np.diff(ids_s, axis=1) - 1], axis=1), 0)[keep]
    if counts_s[keep].max(initial=0) > 255:
        raise ValueError("sample counts above 255 cannot be stored; use targets.samples <= 255")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    count_bytes = counts_s[keep].astype(np.uint8)
    codes = quantize_logprobs(lps_s[keep], codec)
    return {
        "sample_gaps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(gaps.astype(np.int32))),
        "sample_counts": pa.BinaryArray.from_buffers(
            pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(count_bytes.tobytes())]
        ),
        "sample_codes": pa.BinaryArray.from_buffers(
            pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(codes.tobytes())]
        ),
    }


def _ragged_to_padded(lengths: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    """Flat values of rows with `lengths` -> [N, max(lengths)] padded with `fill`."""
    n, width = len(lengths), int(lengths.max(initial=0))
    out = np.full((n, width), fill, dtype=values.dtype)
    mask = np.arange(width)[None, :] < lengths[:, None]
    out[mask] = values
    return out


def _decode_samples(table: pa.Table, codec: CodecParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gaps_col = table.column("sample_gaps").combine_chunks()
    offsets = gaps_col.offsets.to_numpy()
    lengths = np.diff(offsets)
    gaps = gaps_col.values.to_numpy(zero_copy_only=False).astype(np.int64)[offsets[0] : offsets[-1]]
    # ids within a row: cumulative sum of (gap + 1), minus 1, restarted at each row
    steps = gaps + 1
    csum = np.cumsum(steps)
    starts = np.repeat(np.concatenate([[0], csum])[offsets[:-1] - offsets[0]], lengths)
    ids = csum - starts - 1

    def raw_bytes(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        off = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
        data = np.frombuffer(col.buffers()[2], dtype=np.uint8) if col.buffers()[2] is not None else np.zeros(0, np.uint8)
        return data[off[0] : off[-1]]

    counts = raw_bytes("sample_counts").astype(np.int32)
    lps = dequantize_logprobs(raw_bytes("sample_codes"), codec)
    return (
        _ragged_to_padded(lengths, ids, 0),
        _ragged_to_padded(lengths, counts, 0),
        _ragged_to_padded(lengths, lps, np.float32(-np.inf)),
    )


@dataclass
class ShardData:
    """Decoded token rows of one shard (N tokens)."""

    seq_ids: np.ndarray  # [N] int64
    input_ids: np.ndarray  # [N] int32
    target_ids: np.ndarray  # [N, k] int64, ascending per row
    target_logprobs: np.ndarray  # [N, k] float32
    log_normalizers: np.ndarray  # [N, nT] float32
    tail_logprobs: np.ndarray  # [N, nT] float32
    entropy: np.ndarray  # [N] float32
    sample_ids: np.ndarray | None = None  # [N, m] int64, padding id 0 (sampled caches)
    sample_counts: np.ndarray | None = None  # [N, m] int32, 0 = padding
    sample_logprobs: np.ndarray | None = None  # [N, m] float32, -inf = padding


def read_shard(
    source: bytes | BinaryIO, *, k: int, num_temperatures: int, codec: CodecParams = CodecParams()
) -> ShardData:
    """Decode a whole shard file (bytes or a seekable binary file)."""
    table = pq.read_table(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    return decode_table(table, k=k, num_temperatures=num_temperatures, codec=codec)


def decode_table(table: pa.Table, *, k: int, num_temperatures: int, codec: CodecParams = CodecParams()) -> ShardData:
    """Decode token rows already read into an Arrow table (a whole file or some row groups)."""
    n = table.num_rows
    if k > 0 and n:
        gaps = _fixed_binary_to_numpy(table.column("target_gaps"), 4 * k, np.dtype("<u4"))
        codes = _fixed_binary_to_numpy(table.column("target_codes"), k, np.dtype(np.uint8))
    else:
        gaps, codes = np.zeros((n, k), dtype=np.uint32), np.zeros((n, k), dtype=np.uint8)
    samples = _decode_samples(table, codec) if "sample_gaps" in table.column_names else (None, None, None)

    def floats(name: str) -> np.ndarray:
        return table.column(name).to_numpy().astype(np.float32, copy=False)

    return ShardData(
        seq_ids=table.column("seq_id").to_numpy().astype(np.int64, copy=False),
        input_ids=table.column("input_id").to_numpy().astype(np.int32, copy=False),
        target_ids=decode_ids(gaps.reshape(n, k)),
        target_logprobs=dequantize_logprobs(codes.reshape(n, k), codec),
        log_normalizers=np.stack([floats(f"log_normalizer_{j}") for j in range(num_temperatures)], axis=1),
        tail_logprobs=np.stack([floats(f"tail_logprob_{j}") for j in range(num_temperatures)], axis=1),
        entropy=floats("entropy"),
        sample_ids=samples[0],
        sample_counts=samples[1],
        sample_logprobs=samples[2],
    )


def split_sequences(data: ShardData) -> list[tuple[int, slice]]:
    """(seq_id, row slice) of each sequence, in file order (a sequence is a run of equal seq_id)."""
    if len(data.seq_ids) == 0:
        return []
    starts = np.flatnonzero(np.diff(data.seq_ids) != 0) + 1
    bounds = [0, *starts.tolist(), len(data.seq_ids)]
    return [(int(data.seq_ids[a]), slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
