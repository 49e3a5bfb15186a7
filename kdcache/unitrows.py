"""One unit's token rows, held compactly for batching: what `KDCacheDataset` keeps of each open unit.

    rows = UnitRows.from_parquet(read_parquet_table(shard_bytes), k=64, num_temperatures=2, codec=codec)
    seq = rows.sequence(3)          # views, as `kdcache.collate.collate_sequences` takes them
    table = logprob_table(codec)    # codes -> float32 log-probs, for the batch

Compact on purpose. The ids are held as *steps*, `id[0]` then `id[j] - id[j-1]`, assembled from the byte planes
once per unit in a few whole-array passes (in the prefetch thread, not per sequence), in the smallest dtype that
holds them (uint16 when the padded vocabulary has at most 65,536 ids, else int32): `collate_sequences` turns them
into int64 ids with one fused cumsum straight into the batch. The log-probs stay as the stored codes (uint8 by
default) and are decoded straight into the batch through the codec's table. A unit then costs about
(2 or 4 + code bytes) * k + 24 bytes per token (k = 64, V <= 64k: ~216 B, about what the decompressed Arrow table
took) instead of ~12 k bytes for int64 ids and float32 log-probs, and the batch arrays are written once, in their
final dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.codec import CodecParams, dequantize_logprobs, planar_to_values
from kdcache.formats import ShardData
from kdcache.formats.parquet import decode_table

__all__ = ["UnitRows", "logprob_table", "pooled_empty", "read_parquet_table", "read_pooled"]


def pooled_empty(shape: tuple[int, ...], dtype: np.dtype | type | str) -> np.ndarray:
    """An uninitialized numpy array in Arrow's memory pool (mimalloc / jemalloc), writable, 64-byte aligned.

    Why: a reader allocates the same large sizes again and again (unit arrays, batch arrays). glibc serves those
    with fresh mmaps and returns them on free, so every 4 KiB page is faulted in again (measured ~2 us a page here:
    ~0.5 ms per MiB, as much as decoding it); Arrow's pool keeps freed pages mapped and reuses them. The array holds
    its buffer (as `.base`), so it is freed when the array (or a tensor made by `torch.from_numpy`) is.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = pa.allocate_buffer(max(count * dtype.itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def read_pooled(f: BinaryIO, size: int) -> memoryview:
    """Up to `size + 1` bytes of the open binary file `f` into a `pooled_empty` buffer (a file longer than `size`
    shows as size + 1 bytes, so a caller comparing with the expected size sees it)."""
    buf = pooled_empty((size + 1,), np.uint8)
    view, got = memoryview(buf), 0
    while got <= size:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return view[:got]


def read_parquet_table(data: bytes | memoryview) -> pa.Table:
    """A Parquet shard's Arrow table (decompressed, not decoded), read without Arrow's thread pools.

    Not `kdcache.formats.parquet.read_shard_table`, which calls `pq.read_table`: that goes through the Arrow dataset
    scanner (its thread pools are a fork hazard in DataLoader workers; one hang was seen) and imports pyarrow.dataset,
    and pandas with it (~1.5 s), in every fresh worker. Parallelism comes from the prefetch threads instead (Arrow
    releases the GIL while it reads).
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def logprob_table(codec: CodecParams) -> np.ndarray | None:
    """[levels] float32: the log-prob of every code, from `dequantize_logprobs` itself (so it is the codec's own
    decoding, whatever that is); None for codecs whose codes are the values (f32)."""
    if codec.code_dtype.kind != "u":
        return None
    return np.ascontiguousarray(dequantize_logprobs(np.arange(codec.levels, dtype=codec.code_dtype), codec))


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column as numpy (zero-copy for one chunk without nulls)."""
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=False)
    return col.to_numpy()


def _fixed_width(table: pa.Table, name: str) -> np.ndarray:
    """A FIXED_LEN_BYTE_ARRAY column -> [N, W] uint8 (zero-copy for one chunk)."""
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    width = arr.type.byte_width
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + len(arr)) * width)
    return raw[arr.offset * width :].reshape(len(arr), width)


def _planar_steps(raw: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """[N, P * k] planar gap bytes -> [N, k] id steps: `id[0]`, then `id[j] - id[j-1] = gap[j] + 1` (pooled).

    uint16 when every id is < vocab_size <= 2**16 (then every step fits; `id[0] + 1` may wrap, and the -1 wraps it
    back), else int32 (vocab_size <= 2**31). Raises ValueError if the gaps have more byte planes than that dtype.
    """
    if vocab_size > 2**31:
        raise ValueError(f"padded vocabulary {vocab_size} > 2**31: ids do not fit int32 steps")
    wide = vocab_size > 2**16
    steps = planar_to_values(
        raw,
        k,
        np.uint32 if wide else np.uint16,
        out=pooled_empty(raw.shape[:1] + (k,), np.uint32 if wide else np.uint16),
    )
    steps += steps.dtype.type(1)
    steps[:, 0] -= steps.dtype.type(1)
    return steps.view(np.int32) if wide else steps


def _sequence_bounds(seq_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, seq_ids) of the runs of equal seq_id, in row order."""
    if len(seq_col) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.concatenate([[0], np.flatnonzero(seq_col[1:] != seq_col[:-1]) + 1]).astype(np.int64)
    lengths = np.diff(np.append(starts, len(seq_col)))
    return starts, lengths, seq_col[starts].astype(np.int64)


@dataclass
class UnitRows:
    """A unit's N token rows in S sequences (sequence s is rows [starts[s], starts[s] + lengths[s])).

    `ids_key` names what `target_ids` holds, and is the key a sequence carries them under: "target_steps" (ids =
    cumsum along the row), "target_gap_planes" (the stored planar gap bytes [N, P * k] uint8, which compact batches
    decode on the GPU) or "target_ids" (the ids). `target_values` are
    log-prob codes (decode with `logprob_table`) when `values_are_codes`, else float32 log-probs.
    Sampled caches keep the Arrow table (`sample_table`) or the decoded `ShardData` (`sample_data`) and decode a
    sequence's samples when it is batched.
    """

    starts: np.ndarray  # [S] int64
    lengths: np.ndarray  # [S] int64
    seq_ids: np.ndarray  # [S] int64
    input_ids: np.ndarray  # [N] int32
    target_ids: np.ndarray  # [N, k] steps (uint16 | int32), [N, P * k] planar gap bytes, or ids (int64, ascending)
    ids_key: str  # "target_steps" | "target_gap_planes" | "target_ids"
    target_values: np.ndarray  # [N, k] codes (uint8 / uint16) or float32 log-probs
    values_are_codes: bool
    log_normalizers: np.ndarray  # [N, nT] float32
    tail_logprobs: np.ndarray  # [N, nT] float32
    entropy: np.ndarray  # [N] float32
    sample_table: pa.Table | None = None
    sample_data: ShardData | None = None
    decode_args: dict[str, Any] | None = None  # k, num_temperatures, codec (for the samples of a Parquet row slice)

    @property
    def num_sequences(self) -> int:
        return len(self.starts)

    @classmethod
    def from_parquet(
        cls,
        table: pa.Table,
        *,
        k: int,
        num_temperatures: int,
        codec: CodecParams,
        vocab_size: int,
        planar: bool = False,
    ) -> UnitRows:
        """From a Parquet shard's Arrow table (`read_parquet_table`); id steps are held as uint16 when `vocab_size`
        (the teacher's padded vocabulary) allows, else int32; with `planar`, the stored gap bytes are kept as they
        are (zero-copy). Raises ValueError for unexpected columns."""
        n = table.num_rows
        starts, lengths, seq_ids = _sequence_bounds(_column(table, "seq_id"))
        if k > 0:
            gaps_raw, codes_raw = _fixed_width(table, "target_gaps"), _fixed_width(table, "target_codes")
            if gaps_raw.shape[1] % k or codes_raw.shape[1] != codec.code_bytes * k:
                raise ValueError(
                    f"target columns are {gaps_raw.shape[1]} / {codes_raw.shape[1]} bytes wide; expected multiples "
                    f"of k={k} with {codec.code_bytes}-byte codes ({codec.logprobs})"
                )
            ids = gaps_raw if planar else _planar_steps(gaps_raw, k, vocab_size)
            values = planar_to_values(codes_raw, k, codec.code_dtype)
        else:
            ids, values = np.zeros((n, 0), np.uint16), np.zeros((n, 0), codec.code_dtype)
        codes = logprob_table(codec) is not None
        if not codes:
            values = dequantize_logprobs(values, codec)

        def floats(name: str) -> np.ndarray:
            return _column(table, name).astype(np.float32, copy=False)

        def stacked(prefix: str) -> np.ndarray:
            out = pooled_empty((n, num_temperatures), np.float32)
            for j in range(num_temperatures):
                out[:, j] = floats(f"{prefix}_{j}")
            return out

        sampled = "sample_gaps" in table.column_names
        return cls(
            starts=starts,
            lengths=lengths,
            seq_ids=seq_ids,
            input_ids=_column(table, "input_id").astype(np.int32, copy=False),
            target_ids=ids,
            ids_key="target_gap_planes" if planar else "target_steps",
            target_values=values,
            values_are_codes=codes,
            log_normalizers=stacked("log_normalizer"),
            tail_logprobs=stacked("tail_logprob"),
            entropy=floats("entropy"),
            sample_table=table if sampled else None,
            decode_args={"k": k, "num_temperatures": num_temperatures, "codec": codec} if sampled else None,
        )

    @classmethod
    def from_shard_data(cls, data: ShardData) -> UnitRows:
        """From a decoded shard (any format)."""
        starts, lengths, seq_ids = _sequence_bounds(data.seq_ids)
        return cls(
            starts=starts,
            lengths=lengths,
            seq_ids=seq_ids,
            input_ids=data.input_ids,
            target_ids=data.target_ids,
            ids_key="target_ids",
            target_values=data.target_logprobs,
            values_are_codes=False,
            log_normalizers=data.log_normalizers,
            tail_logprobs=data.tail_logprobs,
            entropy=data.entropy,
            sample_data=data if data.sample_ids is not None else None,
        )

    def sequence(self, index: int) -> dict[str, Any]:
        """Sequence `index` (file order) as views: `seq_id`, `input_ids` [T], `target_steps` or `target_ids`
        [T, k] (or `target_gap_planes` [T, P * k]), `target_codes` or `target_logprobs` [T, k],
        `log_normalizers`/`tail_logprobs` [T, nT], `entropy` [T], and for sampled caches
        `sample_ids`/`sample_counts`/`sample_logprobs` [T, m]."""
        start = int(self.starts[index])
        rows = slice(start, start + int(self.lengths[index]))
        seq = {
            "seq_id": self.seq_ids[index],
            "input_ids": self.input_ids[rows],
            self.ids_key: self.target_ids[rows],
            "target_codes" if self.values_are_codes else "target_logprobs": self.target_values[rows],
            "log_normalizers": self.log_normalizers[rows],
            "tail_logprobs": self.tail_logprobs[rows],
            "entropy": self.entropy[rows],
        }
        data, local = self.sample_data, rows
        if self.sample_table is not None:
            data = decode_table(self.sample_table.slice(rows.start, rows.stop - rows.start), **self.decode_args)
            local = slice(0, rows.stop - rows.start)
        if data is not None:
            seq["sample_ids"] = data.sample_ids[local]
            seq["sample_counts"] = data.sample_counts[local]
            seq["sample_logprobs"] = data.sample_logprobs[local]
        return seq
