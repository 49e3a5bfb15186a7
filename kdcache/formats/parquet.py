"""Parquet shards (format v3): write one immutable file per work unit, and read it back. pyarrow alone reads them, and
so do DuckDB and polars (`SELECT *` / `pl.read_parquet` read every column: only encodings they all decode are used).

One row per token, rows ordered by sequence then position; a row group holds whole sequences only (about
`row_group_tokens` tokens, rounded up to the end of a sequence). Columns (docs/FORMAT.md is the contract):

| column               | Parquet type              | encoding (writer's choice) | meaning                             |
|----------------------|---------------------------|----------------------------|-------------------------------------|
| seq_id               | INT64                     | dictionary (RLE)           | deterministic id of the sequence    |
| input_id             | INT32                     | BYTE_STREAM_SPLIT          | the input token at this position    |
| target_gaps_p{p}_{j} | FIXED_LEN_BYTE_ARRAY(<=16)| PLAIN                      | byte p of the gaps at positions j.. |
| target_codes_p{p}    | FIXED_LEN_BYTE_ARRAY(k)   | PLAIN                      | byte p of the k log-prob codes      |
| log_normalizer_{t}   | FLOAT                     | BYTE_STREAM_SPLIT          | logsumexp(z / T_t) over the vocab   |
| tail_logprob_{t}     | FLOAT16                   | PLAIN                      | log mass outside the k ids at T_t   |
| entropy              | FLOAT16                   | PLAIN                      | entropy of the distribution at T=1  |
| sample_gaps          | LIST<INT32>               | BYTE_STREAM_SPLIT          | gap-coded unique sampled ids        |
| sample_counts        | BYTE_ARRAY                | DELTA_LENGTH_BYTE_ARRAY    | one uint8 draw count per sampled id |
| sample_codes         | BYTE_ARRAY                | DELTA_LENGTH_BYTE_ARRAY    | B-byte log-prob code per sampled id |
| prompt_id            | INT64                     | dictionary (RLE)           | generated: the source record's id   |
| sample_index         | INT32                     | dictionary (RLE)           | generated: which response it is     |
| token_text           | BYTE_ARRAY                | DELTA_LENGTH_BYTE_ARRAY    | the text behind the token (optional)|

The head's gaps are split into byte planes (p = 0 least significant; P planes, enough for the teacher's padded
vocabulary) and each plane into slices of 16 positions: the column `target_gaps_p{p}_{j}` holds byte p of the gaps
at positions j, j + 1, ... j + 15. Separate slices let zstd code each plane of a few neighbouring positions on its
own, which is what BYTE_STREAM_SPLIT on one wide column did in format v2 (within 0.2 bytes per token; DuckDB and
polars cannot decode that encoding on fixed-length byte arrays, so v3 does not use it there). The codes are split
into their B byte planes (u8: 1, u16: 2, f32: 4) only. Positions without a target are null in every target column
(target_*, log_normalizer_*, tail_logprob_*, entropy, sample_*), so they cost no target bytes. prompt_id and
sample_index exist when the sequences are generated responses (`formats.base.SEQUENCE_FIELDS`): each sequence's
value on every one of its rows, runs that cost a few bytes per sequence.

Reading is bounded by what the manifest declares (`ShardCounts`): the footer's row count must match, the page
headers of every column read are summed against a bound linear in the tokens (`kdcache.formats.limits`), and only
the declared columns are decompressed (unknown ones are ignored, as docs/FORMAT.md promises).
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
from kdcache.formats.base import (
    MAX_TEXT_BYTES_PER_TOKEN,
    SEQUENCE_FIELDS,
    BufferedShardWriter,
    ShardCounts,
    ShardData,
    expand_rows,
)
from kdcache.formats.limits import parquet_page_bytes
from kdcache.formats.memory import pooled_empty
from kdcache.formats.rows import (
    RaggedSamples,
    UnitRows,
    logprob_table,
    sequence_bounds,
    step_work_dtype,
    steps_in_place,
    text_parts,
)

__all__ = [
    "GAP_SLICE",
    "NAME",
    "SUFFIX",
    "ShardWriter",
    "column_bytes",
    "decode_table",
    "declared_columns",
    "read_rows",
    "read_shard",
    "read_shard_info",
    "read_table",
    "read_token_text",
    "rows_from_table",
]

NAME = "parquet"
SUFFIX = ".parquet"
ROW_GROUP_TOKENS = 65536  # tokens per row group (rounded up to whole sequences)
GAP_SLICE = 16  # positions per target_gaps_p{p}_{j} column
_MAX_PLANES = 4  # gaps are < 2**32
_ASSEMBLY_ROWS = 2048  # rows per block when gaps are assembled from their slices (the block stays in cache)
_CHUNK_SLACK = 1 << 16  # bytes a column chunk may decompress to beyond its per-row bound (dictionary, headers)
_THRIFT_LIMITS = {"thrift_string_size_limit": 1 << 24, "thrift_container_size_limit": 1 << 20}


@dataclass(frozen=True)
class _Column:
    """One declared column: its name, Arrow type, Parquet physical type (and byte length for FIXED_LEN_BYTE_ARRAY),
    the most bytes a row may decompress to (values and levels), and whether it is a target column (null where a
    position has no target)."""

    name: str
    arrow: pa.DataType
    physical: str
    length: int
    row_bytes: int
    target: bool


def _gap_slices(k: int, planes: int) -> list[tuple[str, int, int, int]]:
    """(column, plane, first position, width) of the head's gap columns."""
    return [
        (f"target_gaps_p{p}_{j}", p, j, min(GAP_SLICE, k - j)) for p in range(planes) for j in range(0, k, GAP_SLICE)
    ]


def declared_columns(
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    planes: int,
    num_samples: int,
    sequence_fields: tuple[str, ...] = (),
    token_text: bool = False,
) -> list[_Column]:
    """Every column of a v3 shard with this layout, in file order (`planes`: the gap byte planes P;
    `sequence_fields`: the names of `SEQUENCE_FIELDS` the shard stores; `token_text`: the optional text column,
    last, declared only where it is to be read)."""
    cols = [
        _Column("seq_id", pa.int64(), "INT64", 0, 16, False),
        _Column("input_id", pa.int32(), "INT32", 0, 6, False),
    ]
    if k > 0:
        cols += [
            _Column(name, pa.binary(w), "FIXED_LEN_BYTE_ARRAY", w, w + 2, True)
            for name, _, _, w in _gap_slices(k, planes)
        ]
        cols += [
            _Column(f"target_codes_p{p}", pa.binary(k), "FIXED_LEN_BYTE_ARRAY", k, k + 2, True)
            for p in range(codec.code_bytes)
        ]
    for t in range(num_temperatures):
        cols += [
            _Column(f"log_normalizer_{t}", pa.float32(), "FLOAT", 0, 6, True),
            _Column(f"tail_logprob_{t}", pa.float16(), "FIXED_LEN_BYTE_ARRAY", 2, 4, True),
        ]
    cols.append(_Column("entropy", pa.float16(), "FIXED_LEN_BYTE_ARRAY", 2, 4, True))
    if num_samples > 0:
        m = num_samples  # unique sampled ids per token are at most the draws
        cols += [
            _Column("sample_gaps", pa.list_(pa.int32()), "INT32", 0, 6 * m + 8, True),
            _Column("sample_counts", pa.binary(), "BYTE_ARRAY", 0, m + 8, True),
            _Column("sample_codes", pa.binary(), "BYTE_ARRAY", 0, m * codec.code_bytes + 8, True),
        ]
    for name in sequence_fields:
        arrow = pa.from_numpy_dtype(SEQUENCE_FIELDS[name])
        cols.append(_Column(name, arrow, "INT64" if arrow == pa.int64() else "INT32", 0, 16, False))
    if token_text:  # bounded on average over a row group: single tokens may hold more
        cols.append(_Column("token_text", pa.binary(), "BYTE_ARRAY", 0, MAX_TEXT_BYTES_PER_TOKEN + 8, False))
    return cols


def _fixed_binary(raw: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """[R, W] uint8 rows -> FixedSizeBinaryArray of width W (zero-copy), or of len(mask) rows, null where mask is
    False, when `mask` is given."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if mask is None:
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), len(raw), [None, pa.py_buffer(raw)])
    full = expand_rows(mask, raw, 0)
    validity = pa.py_buffer(np.packbits(mask, bitorder="little"))
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(raw.shape[1]), len(mask), [validity, pa.py_buffer(full)], null_count=len(mask) - len(raw)
    )


def _primitive(values: np.ndarray, mask: np.ndarray | None) -> pa.Array:
    """A primitive column of len(mask) rows from the values of its True positions (null at the others)."""
    if mask is None:
        return pa.array(np.ascontiguousarray(values))
    return pa.array(expand_rows(mask, np.ascontiguousarray(values), 0), mask=~mask)


def _fixed_binary_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A FIXED_LEN_BYTE_ARRAY column -> [N, W] uint8 (zero-copy for a single chunk; rows of nulls undefined)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    width = column.type.byte_width
    if len(column) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=(column.offset + len(column)) * width)
    return raw[column.offset * width :].reshape(len(column), width)


def _binary_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [N + 1] int64 from 0, concatenated value bytes uint8) of a BYTE_ARRAY column."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(col) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    off = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1].astype(np.int64)
    data = col.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return off - off[0], values[off[0] : off[-1]]


@dataclass
class ShardWriter(BufferedShardWriter):
    """Collects a unit's sequences and produces the Parquet file bytes (`add` ... `finish`).

    Args:
        k: top-k entries per token; num_temperatures: number of stored temperatures (index 0 is T = 1);
        num_samples: draws per token (0: no sample columns); compression_level: zstd level;
        codec: log-prob coding; metadata: JSON-able dict stored in the file's key-value metadata under "kdcache";
        row_group_tokens: tokens per row group (whole sequences, so a group can be a sequence longer);
        vocab_size: the teacher's padded vocabulary: the gap byte planes P are those of `vocab_size - 1`, the same
            for every shard of a cache (None: the fewest planes that hold this shard's largest gap).
    """

    row_group_tokens: int = ROW_GROUP_TOKENS

    def planes(self, gaps: np.ndarray) -> int:
        """The gap byte planes P this shard stores (raises ValueError if a gap needs more than `vocab_size` allows)."""
        needed = gap_planes(gaps)
        if self.vocab_size is None:
            return needed
        planes = gap_planes(np.array([max(int(self.vocab_size) - 1, 0)]))
        if needed > planes:
            raise ValueError(f"a target id is not below the vocabulary size {self.vocab_size}")
        return planes

    def schema(self, planes: int = 1, sequence_fields: tuple[str, ...] = ()) -> pa.Schema:
        columns = declared_columns(
            self.k,
            self.num_temperatures,
            self.codec,
            planes,
            self.num_samples,
            sequence_fields,
            token_text=self.token_text,
        )
        described = {
            **self.metadata,
            "k": self.k,
            "num_samples": self.num_samples,
            "codec": self.codec.to_dict(),
            "gap_planes": planes,
        }
        fields = [pa.field(c.name, c.arrow) for c in columns]
        return pa.schema(fields, metadata={"kdcache": json.dumps(described, sort_keys=True)})

    def _table(
        self, a: dict[str, np.ndarray], tokens: slice, targets: slice, planes: int, schema: pa.Schema
    ) -> pa.Table:
        """Token rows `tokens` (whose targets are rows `targets` of the target arrays) as an Arrow table."""
        n = tokens.stop - tokens.start
        mask = a["target_mask"][tokens]
        masked = None if targets.stop - targets.start == n else mask
        seq_ids = np.repeat(a["seq_ids"], a["seq_lengths"])[tokens]
        columns: dict[str, pa.Array] = {"seq_id": pa.array(seq_ids), "input_id": pa.array(a["input_ids"][tokens])}
        for name in schema.names:
            if name in SEQUENCE_FIELDS:  # the sequence's value on each of its rows
                columns[name] = pa.array(np.repeat(a[f"field_{name}"], a["seq_lengths"])[tokens])
        if self.k > 0:
            gap_bytes = values_to_planar(a["gaps"][targets], planes)
            for name, p, j, width in _gap_slices(self.k, planes):
                columns[name] = _fixed_binary(gap_bytes[:, p * self.k + j : p * self.k + j + width], masked)
            code_bytes = values_to_planar(a["codes"][targets], self.codec.code_bytes)
            for p in range(self.codec.code_bytes):
                columns[f"target_codes_p{p}"] = _fixed_binary(code_bytes[:, p * self.k : (p + 1) * self.k], masked)
        for j in range(self.num_temperatures):
            columns[f"log_normalizer_{j}"] = _primitive(a["log_normalizers"][targets, j], masked)
            columns[f"tail_logprob_{j}"] = _primitive(a["tail_logprobs"][targets, j].astype(np.float16), masked)
        columns["entropy"] = _primitive(a["entropy"][targets].astype(np.float16), masked)
        if self.num_samples > 0:
            columns |= self._sample_columns(a, targets, mask, masked)
        if self.token_text:
            columns["token_text"] = _text_column(a, tokens)
        return pa.Table.from_pydict(columns, schema=schema)

    def _sample_columns(
        self, a: dict[str, np.ndarray], targets: slice, mask: np.ndarray, masked: np.ndarray | None
    ) -> dict[str, pa.Array]:
        n = len(mask)
        entry_offsets = np.concatenate([[0], np.cumsum(a["sample_lengths"], dtype=np.int64)])
        e0, e1 = int(entry_offsets[targets.start]), int(entry_offsets[targets.stop])
        lengths = expand_rows(mask, a["sample_lengths"][targets].astype(np.int64), 0)
        local = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        validity = None if masked is None else pa.py_buffer(np.packbits(mask, bitorder="little"))
        nulls = 0 if masked is None else n - int(np.count_nonzero(mask))
        code_bytes = self.codec.code_bytes
        codes = np.ascontiguousarray(a["sample_codes"][e0:e1]).astype(self.codec.code_dtype, copy=False)
        return {
            "sample_gaps": pa.ListArray.from_arrays(
                pa.array(local),
                pa.array(a["sample_gaps"][e0:e1].view(np.int32)),
                mask=None if masked is None else pa.array(~mask),
            ),
            "sample_counts": pa.BinaryArray.from_buffers(
                pa.binary(),
                n,
                [validity, pa.py_buffer(local), pa.py_buffer(a["sample_counts"][e0:e1].tobytes())],
                nulls,
            ),
            "sample_codes": pa.BinaryArray.from_buffers(
                pa.binary(), n, [validity, pa.py_buffer(local * code_bytes), pa.py_buffer(codes.tobytes())], nulls
            ),
        }

    def finish(self) -> bytes:
        """The complete Parquet file as bytes (one row group per ~row_group_tokens, whole sequences only)."""
        a = self._buffer.arrays()
        planes = self.planes(a["gaps"])
        sequence_fields = tuple(self._buffer.sequence_field_names())
        schema = self.schema(planes, sequence_fields)
        encodings = {"input_id": "BYTE_STREAM_SPLIT"}
        for name in schema.names:
            if name.startswith("log_normalizer_"):
                encodings[name] = "BYTE_STREAM_SPLIT"
            elif name.startswith(("target_", "tail_logprob_")) or name == "entropy":
                encodings[name] = "PLAIN"
        if self.num_samples > 0:
            encodings.update(
                {
                    "sample_gaps.list.element": "BYTE_STREAM_SPLIT",
                    "sample_counts": "DELTA_LENGTH_BYTE_ARRAY",
                    "sample_codes": "DELTA_LENGTH_BYTE_ARRAY",
                }
            )
        if self.token_text:
            encodings["token_text"] = "DELTA_LENGTH_BYTE_ARRAY"
        target_offsets = np.concatenate([[0], np.cumsum(a["target_mask"], dtype=np.int64)])
        sink = io.BytesIO()
        with pq.ParquetWriter(
            sink,
            schema,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=["seq_id", *sequence_fields],
            column_encoding=encodings,
            write_statistics=["seq_id", "log_normalizer_0"],  # the latter's null counts: the targets of a row group
        ) as writer:
            for lo, hi in _row_group_bounds(a["seq_lengths"], self.row_group_tokens):
                targets = slice(int(target_offsets[lo]), int(target_offsets[hi]))
                writer.write_table(
                    self._table(a, slice(lo, hi), targets, planes, schema), row_group_size=max(hi - lo, 1)
                )
        return sink.getvalue()


def _text_column(a: dict[str, np.ndarray], tokens: slice) -> pa.Array:
    """The token text of tokens `tokens` as a BinaryArray, null where the text is unknown."""
    lengths = a["text_lengths"].astype(np.int64)
    known = lengths >= 0
    offsets = np.concatenate([[0], np.cumsum(np.where(known, lengths, 0))])
    b0, b1 = int(offsets[tokens.start]), int(offsets[tokens.stop])
    local = (offsets[tokens.start : tokens.stop + 1] - b0).astype(np.int32)
    part = known[tokens]
    nulls = len(part) - int(np.count_nonzero(part))
    validity = pa.py_buffer(np.packbits(part, bitorder="little")) if nulls else None
    data = pa.py_buffer(np.ascontiguousarray(a["text_bytes"][b0:b1]).tobytes())
    return pa.BinaryArray.from_buffers(pa.binary(), len(part), [validity, pa.py_buffer(local), data], nulls)


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


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _source(source: bytes | memoryview | BinaryIO) -> Any:
    """What pyarrow reads: a zero-copy reader over bytes-like data, or the seekable binary file itself."""
    return pa.BufferReader(source) if isinstance(source, (bytes, bytearray, memoryview)) else source


def _open(source: bytes | memoryview | BinaryIO) -> pq.ParquetFile:
    """The file's footer (Thrift sizes bounded; no pre-buffering, which would use Arrow's I/O threads)."""
    return pq.ParquetFile(_source(source), pre_buffer=False, **_THRIFT_LIMITS)


def _byte_range(source: bytes | memoryview | BinaryIO, start: int, size: int) -> bytes | memoryview:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source)[start : start + size]
    source.seek(start)
    return source.read(size)


def _source_size(source: bytes | memoryview | BinaryIO) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return source.seek(0, io.SEEK_END)


@dataclass(frozen=True)
class _Checked:
    """An opened shard whose schema matches the declared layout: its footer, declared columns and gap planes."""

    file: pq.ParquetFile
    columns: list[_Column]
    planes: int


def _check(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    num_samples: int | None,
    counts: ShardCounts | None,
    only: tuple[str, ...] | None = None,
    token_text: bool = False,
) -> _Checked:
    """Open a shard and check, before anything is decompressed: every declared column is there with its Arrow and
    Parquet types; the row count is the declared one; the pages of the columns to be read (`only`, default all
    declared) claim at most a bound linear in the declared tokens. Raises ValueError naming what is wrong."""
    pf = _open(source)
    arrow_schema = pf.schema_arrow  # built anew by every access
    names = arrow_schema.names
    planes = 0
    while planes < _MAX_PLANES and f"target_gaps_p{planes}_0" in names:
        planes += 1
    if k > 0 and planes == 0:
        raise ValueError("lacks the column 'target_gaps_p0_0' (not a format v3 shard)")
    sampled = ("sample_gaps" in names) if num_samples is None else num_samples
    fields = tuple(name for name in SEQUENCE_FIELDS if name in names)  # optional: generated responses
    declared = declared_columns(
        k, num_temperatures, codec, planes, 255 if sampled is True else int(sampled), fields, token_text=token_text
    )
    leaves = {pf.schema.column(i).path: pf.schema.column(i) for i in range(len(pf.schema))}
    for col in declared:
        if col.name not in names:
            raise ValueError(f"lacks the column {col.name!r}")
        arrow = arrow_schema.field(col.name).type
        ok = (
            pa.types.is_list(arrow) and arrow.value_type == col.arrow.value_type
            if pa.types.is_list(col.arrow)
            else arrow == col.arrow
        )
        leaf = leaves.get(f"{col.name}.list.element" if pa.types.is_list(col.arrow) else col.name)
        if not ok or leaf is None or leaf.physical_type != col.physical or (col.length and leaf.length != col.length):
            found = f"{arrow}" + (f" ({leaf.physical_type}, length {leaf.length})" if leaf is not None else "")
            expected = f"{col.arrow} ({col.physical}" + (f", length {col.length})" if col.length else ")")
            raise ValueError(f"column {col.name!r} is {found}, expected {expected}")
    metadata = pf.metadata
    if counts is not None and metadata.num_rows != counts.num_tokens:
        raise ValueError(f"holds {metadata.num_rows} rows, the manifest declares {counts.num_tokens} tokens")
    wanted = {c.name: c for c in declared if only is None or c.name in only}
    size = _source_size(source)
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        rows = group.num_rows
        for c in range(group.num_columns):
            chunk = group.column(c)
            col = wanted.get(chunk.path_in_schema.split(".", 1)[0])
            if col is None or chunk.num_values == 0:
                continue  # not read (never decompressed), or Arrow reads no page of it
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset and 0 < chunk.dictionary_page_offset < start:
                start = chunk.dictionary_page_offset
            length = chunk.total_compressed_size
            if start < 0 or length < 0 or start + length > size:
                raise ValueError(f"column {col.name!r} lies outside the file")
            limit = rows * (col.row_bytes + 4) + _CHUNK_SLACK  # + 4: dictionary indices, when a writer uses them
            try:
                parquet_page_bytes(_byte_range(source, start, length), limit)
            except ValueError as exc:
                raise ValueError(f"column {col.name!r}, row group {g}: {exc}") from None
    return _Checked(pf, [c for c in declared if c.name in wanted], planes)


def read_table(source: bytes | memoryview | BinaryIO, columns: list[str] | None = None) -> pa.Table:
    """A shard's Arrow table (decompressed, not decoded), unchecked: for benchmarks and tools that trust the file;
    kdcache's readers go through `read_shard` / `read_rows`, which check it first.

    `ParquetFile.read` without Arrow's thread pools (no pre-buffering either), not `pq.read_table`: that goes through
    the Arrow dataset scanner, whose thread pools are a fork hazard in DataLoader workers (hangs, and aborts at
    interpreter exit), and imports pyarrow.dataset and pandas with it (~1.5 s) in every fresh worker. Parallelism
    comes from the reader's threads instead (Arrow releases the GIL while it reads).
    """
    return _open(source).read(columns=columns, use_threads=False)


def _read_checked(checked: _Checked) -> pa.Table:
    return checked.file.read(columns=[c.name for c in checked.columns], use_threads=False)


def _target_mask(table: pa.Table, counts: ShardCounts | None) -> np.ndarray | None:
    """[N] bool, True where a position carries targets (None: every position does), after checking that every
    target column is null exactly there."""
    n = table.num_rows
    first = table.column("log_normalizer_0")
    nulls = first.null_count
    mask = None
    if nulls:
        mask = np.empty(n, dtype=bool)
        offset = 0
        for chunk in first.chunks:
            mask[offset : offset + len(chunk)] = chunk.is_valid().to_numpy(zero_copy_only=False)
            offset += len(chunk)
    for name in table.column_names:
        if name in SEQUENCE_FIELDS:  # sample_index: a sequence's field, not a target column
            continue
        if name.startswith(("target_", "log_normalizer_", "tail_logprob_", "sample_")) or name == "entropy":
            column = table.column(name)
            if column.null_count != nulls:
                raise ValueError(f"column {name!r} has {column.null_count} nulls, 'log_normalizer_0' {nulls}")
            if nulls and not np.array_equal(column.is_valid().to_numpy(zero_copy_only=False), mask):
                raise ValueError(f"column {name!r} is null at other positions than 'log_normalizer_0'")
    if counts is not None and n - nulls != counts.num_target_tokens:
        raise ValueError(f"holds {n - nulls} target positions, the manifest declares {counts.num_target_tokens}")
    return mask


def _used_planes(table: pa.Table, k: int, planes: int) -> int:
    """The gap planes that hold a nonzero byte (at least 1): the writer stores the vocabulary's planes, so a shard's
    top plane is often all zero (V = 128k: gaps above 65,535 are rare); reading skips it (~5% of a unit's decode)."""
    while planes > 1 and not any(
        _fixed_binary_to_numpy(table.column(name)).any() for name, p, _, _ in _gap_slices(k, planes) if p == planes - 1
    ):
        planes -= 1
    return planes


def _gap_bytes(table: pa.Table, k: int, planes: int, mask: np.ndarray | None) -> np.ndarray:
    """[N, P' * k] planar gap bytes (pooled) assembled from the gap slice columns, P' the planes in use (the top
    all-zero ones left out, as format v2 stored them); zero at positions without a target."""
    planes = _used_planes(table, k, planes)
    n = table.num_rows
    out = pooled_empty((n, planes * k), np.uint8)
    for name, p, j, width in _gap_slices(k, planes):
        column = _fixed_binary_to_numpy(table.column(name))
        if n:  # each slice row as one `width`-byte item: one strided copy, not a short loop per row (~3x faster)
            items = f"V{width}"
            out[:, p * k + j : p * k + j + width].view(items)[:, 0] = np.ascontiguousarray(column).view(items)[:, 0]
    if mask is not None:
        out[~mask] = 0
    return out


def _gap_values(table: pa.Table, k: int, planes: int, dtype: np.dtype, mask: np.ndarray | None) -> np.ndarray:
    """[N, k] gaps (pooled, `dtype`: uint16 or uint32) assembled from the gap slice columns, block by block and slice
    by slice (the byte planes of a slice are shifted together in a small buffer, then written into place once);
    zero where a position has no target. Raises ValueError if a gap does not fit `dtype`."""
    n, width = table.num_rows, np.dtype(dtype).itemsize
    planes = _used_planes(table, k, planes)
    columns = {(p, j): _fixed_binary_to_numpy(table.column(name)) for name, p, j, _ in _gap_slices(k, planes)}
    for (p, _), column in columns.items():
        if p >= width and column.any():
            raise ValueError(f"gaps of {p + 1} bytes do not fit {np.dtype(dtype)} (vocabulary too small?)")
    top = min(planes, width) - 1
    out = pooled_empty((n, k), dtype)
    work = np.empty((min(n, _ASSEMBLY_ROWS), GAP_SLICE), dtype=dtype)
    for lo in range(0, n, _ASSEMBLY_ROWS):
        hi = min(n, lo + _ASSEMBLY_ROWS)
        for j in range(0, k, GAP_SLICE):
            w = min(GAP_SLICE, k - j)
            block = work[: hi - lo, :w]
            np.copyto(block, columns[(top, j)][lo:hi])
            for p in range(top - 1, -1, -1):
                block <<= 8
                block |= columns[(p, j)][lo:hi]
            out[lo:hi, j : j + w] = block
    if mask is not None:
        out[~mask] = 0
    return out


def _codes(table: pa.Table, k: int, codec: CodecParams, mask: np.ndarray | None) -> np.ndarray:
    """[N, k] log-prob codes (codec dtype; zero-copy for one-byte codes in one chunk); zero where no target."""
    if codec.code_bytes == 1:
        codes = _fixed_binary_to_numpy(table.column("target_codes_p0")).view(codec.code_dtype)
        if mask is not None:
            codes = codes.copy()
    else:
        raw = np.concatenate(
            [_fixed_binary_to_numpy(table.column(f"target_codes_p{p}")) for p in range(codec.code_bytes)], axis=1
        )
        codes = planar_to_values(raw, k, codec.code_dtype)
    if mask is not None:
        codes[~mask] = 0
    return codes


def _samples(table: pa.Table, codec: CodecParams, num_samples: int | None) -> RaggedSamples | None:
    """The table's sampled targets, ragged as stored (None when the shard has no sample columns), after checking
    that the three sample columns agree entry for entry."""
    if "sample_gaps" not in table.column_names:
        return None
    gaps_col = table.column("sample_gaps").combine_chunks()
    offsets = gaps_col.offsets.to_numpy().astype(np.int64)
    gaps = gaps_col.values.to_numpy(zero_copy_only=False).view(np.uint32)[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    lengths = np.diff(offsets)
    if len(lengths) and int(lengths.max()) > (num_samples or 255):
        raise ValueError(f"a token holds {int(lengths.max())} sampled ids, more than the {num_samples or 255} draws")
    count_offsets, counts = _binary_parts(table.column("sample_counts"))
    code_offsets, codes = _binary_parts(table.column("sample_codes"))
    if not np.array_equal(count_offsets, offsets) or not np.array_equal(code_offsets, offsets * codec.code_bytes):
        raise ValueError("sample_counts / sample_codes do not hold one entry per sampled id")
    return RaggedSamples(offsets=offsets, gaps=gaps, counts=counts, codes=codes.view(codec.code_dtype), codec=codec)


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column as numpy (zero-copy for one chunk without nulls; NaN at nulls of a float column)."""
    col = table.column(name)
    return col.chunk(0).to_numpy(zero_copy_only=False) if col.num_chunks == 1 else col.to_numpy()


def _per_temperature(table: pa.Table, prefix: str, num_temperatures: int) -> np.ndarray:
    """[N, nT] float32 (pooled) from the columns `{prefix}_0`, `{prefix}_1`, ..."""
    out = pooled_empty((table.num_rows, num_temperatures), np.float32)
    for j in range(num_temperatures):
        out[:, j] = _numpy(table, f"{prefix}_{j}")
    return out


def _side(table: pa.Table, num_temperatures: int, mask: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """(log_normalizers, tail_logprobs [N, nT], entropy [N]) float32; 0, -inf, 0 where there is no target."""
    norms = _per_temperature(table, "log_normalizer", num_temperatures)
    tails = _per_temperature(table, "tail_logprob", num_temperatures)
    entropy = _numpy(table, "entropy").astype(np.float32, copy=mask is not None)
    if mask is not None:
        norms[~mask], tails[~mask], entropy[~mask] = 0.0, -np.inf, 0.0
    return norms, tails, entropy


def _sequence_fields(table: pa.Table, starts: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The table's `SEQUENCE_FIELDS` columns (None when it has none): per token, or at ``starts`` (per sequence)."""
    out = {}
    for name, dtype in SEQUENCE_FIELDS.items():
        if name in table.column_names:
            if table.column(name).null_count:
                raise ValueError(f"column {name!r} has nulls (every row carries its sequence's value)")
            values = _numpy(table, name).astype(dtype, copy=False)
            out[name] = values if starts is None else values[starts]
    return out or None


def _sequences(table: pa.Table, counts: ShardCounts | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, lengths, seq_ids = sequence_bounds(_numpy(table, "seq_id"))
    if counts is not None and len(starts) != counts.num_sequences:
        raise ValueError(f"holds {len(starts)} sequences, the manifest declares {counts.num_sequences}")
    return starts, lengths, seq_ids


def read_shard(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams = CodecParams(),
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
) -> ShardData:
    """Decode a whole shard file (bytes or a seekable binary file), checked first (see `_check`).

    Args:
        num_samples: the cache's draws per token (0: not sampled); None reads the sample columns if present.
        counts: what the manifest declares the shard holds; None bounds nothing (a lone file a tool trusts).

    Raises:
        ValueError: the shard does not match the layout or the counts, or a size bound.
    """
    checked = _check(
        source, k=k, num_temperatures=num_temperatures, codec=codec, num_samples=num_samples, counts=counts
    )
    return decode_table(_read_checked(checked), k=k, num_temperatures=num_temperatures, codec=codec, counts=counts)


def read_rows(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    vocab_size: int,
    planar: bool = False,
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
    token_text: bool = False,
) -> UnitRows:
    """A shard's rows, compact for batching (`kdcache.formats.rows`), checked first (arguments as `read_shard`);
    see `rows_from_table`. `token_text` also reads the text behind the tokens (a shard without it is refused)."""
    checked = _check(
        source,
        k=k,
        num_temperatures=num_temperatures,
        codec=codec,
        num_samples=num_samples,
        counts=counts,
        token_text=token_text,
    )
    return rows_from_table(
        _read_checked(checked),
        k=k,
        num_temperatures=num_temperatures,
        codec=codec,
        vocab_size=vocab_size,
        planar=planar,
        counts=counts,
        num_samples=num_samples,
    )


def _text(column: pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, bytes, known) of the `token_text` column of n rows (`kdcache.formats.rows.text_parts`)."""
    offsets, values = _binary_parts(column)
    text_lengths = np.diff(offsets)
    if column.null_count:
        text_lengths = np.where(column.is_valid().to_numpy(zero_copy_only=False), text_lengths, -1)
    return text_parts(text_lengths, values, n)


def read_token_text(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
) -> dict[str, np.ndarray]:
    """Only the text behind a shard's tokens (`text_offsets`, `text_bytes`, `text_known`, as `read_rows` gives them
    with `token_text`), checked like every read (arguments as `read_shard`); no target column is decompressed."""
    checked = _check(
        source,
        k=k,
        num_temperatures=num_temperatures,
        codec=codec,
        num_samples=num_samples,
        counts=counts,
        only=("token_text",),
        token_text=True,
    )
    table = _read_checked(checked)
    offsets, values, known = _text(table.column("token_text"), table.num_rows)
    return {"text_offsets": offsets, "text_bytes": values, "text_known": known}


def _planes_of(table: pa.Table) -> int:
    planes = 0
    while f"target_gaps_p{planes}_0" in table.column_names:
        planes += 1
    return planes


def rows_from_table(
    table: pa.Table,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    vocab_size: int,
    planar: bool = False,
    counts: ShardCounts | None = None,
    num_samples: int | None = None,
) -> UnitRows:
    """Compact rows of a shard's table: id steps in uint16 when `vocab_size` (the teacher's padded vocabulary)
    allows, else int32; with `planar`, the stored gap bytes [N, P * k]. Raises ValueError for unexpected columns."""
    n = table.num_rows
    mask = _target_mask(table, counts)
    starts, lengths, seq_ids = _sequences(table, counts)
    if k > 0:
        planes = _planes_of(table)
        if planar:
            ids = _gap_bytes(table, k, planes, mask)
        else:
            ids = steps_in_place(_gap_values(table, k, planes, step_work_dtype(vocab_size), mask), vocab_size)
        codes = _codes(table, k, codec, mask)
    else:
        ids, codes = np.zeros((n, 0), np.uint16), np.zeros((n, 0), codec.code_dtype)
    are_codes = logprob_table(codec) is not None
    norms, tails, entropy = _side(table, num_temperatures, mask)
    text = _text(table.column("token_text"), n) if "token_text" in table.column_names else (None, None, None)
    return UnitRows(
        starts=starts,
        lengths=lengths,
        seq_ids=seq_ids,
        input_ids=_numpy(table, "input_id").astype(np.int32, copy=False),
        target_ids=ids,
        ids_key="target_gap_planes" if planar else "target_steps",
        target_values=codes if are_codes else dequantize_logprobs(codes, codec),
        values_are_codes=are_codes,
        log_normalizers=norms,
        tail_logprobs=tails,
        entropy=entropy,
        samples=_samples(table, codec, num_samples),
        target_mask=mask,
        text_offsets=text[0],
        text_bytes=text[1],
        text_known=text[2],
        sequence_fields=_sequence_fields(table, starts),
    )


def decode_table(
    table: pa.Table,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams = CodecParams(),
    counts: ShardCounts | None = None,
    num_samples: int | None = None,
) -> ShardData:
    """Decode token rows already read into an Arrow table (a whole file, some row groups, or a row slice)."""
    n = table.num_rows
    mask = _target_mask(table, counts)
    _sequences(table, counts)
    if k > 0:
        target_ids = decode_planar_gaps(_gap_bytes(table, k, _planes_of(table), mask), k)  # cache-blocked
        target_logprobs = dequantize_logprobs(_codes(table, k, codec, mask), codec)
        if mask is not None:
            target_ids[~mask], target_logprobs[~mask] = -1, -np.inf
    else:
        target_ids, target_logprobs = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    ragged = _samples(table, codec, num_samples)
    samples = ragged.padded(0, n) if ragged is not None else (None, None, None)
    norms, tails, entropy = _side(table, num_temperatures, mask)
    return ShardData(
        seq_ids=_numpy(table, "seq_id").astype(np.int64, copy=False),
        input_ids=_numpy(table, "input_id").astype(np.int32, copy=False),
        target_ids=target_ids,
        target_logprobs=target_logprobs,
        log_normalizers=norms,
        tail_logprobs=tails,
        entropy=entropy,
        sample_ids=samples[0],
        sample_counts=samples[1],
        sample_logprobs=samples[2],
        target_mask=np.ones(n, dtype=bool) if mask is None else mask,
        sequence_fields=_sequence_fields(table),
    )


def read_shard_info(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int | None = None,
    num_temperatures: int = 1,
    codec: CodecParams | None = None,
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
) -> dict[str, Any]:
    """Counts and self-description from the footer and the seq_id column only (no target is decompressed).

    With the layout (`k`, `num_temperatures`, `codec`, `num_samples`) every declared column's types are checked
    too, and with `counts` the row count and the seq_id pages' sizes, as readers check them.

    Returns {"num_tokens", "num_sequences", "num_target_tokens" (None when the footer has no null counts),
    "metadata"}; raises ValueError (or an Arrow error) for a file that cannot be read.
    """
    if k is not None:
        pf = _check(
            source,
            k=k,
            num_temperatures=num_temperatures,
            codec=codec or CodecParams(),
            num_samples=num_samples,
            counts=counts,
            only=("seq_id",),
        ).file
    else:
        pf = _open(source)
    raw = (pf.schema_arrow.metadata or {}).get(b"kdcache", b"{}")
    seq = pf.read(columns=["seq_id"], use_threads=False).column("seq_id").to_numpy()
    runs = int(np.count_nonzero(np.diff(seq))) + 1 if len(seq) else 0
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("its 'kdcache' metadata is not JSON") from None
    return {
        "num_tokens": pf.metadata.num_rows,
        "num_sequences": runs,
        "num_target_tokens": _footer_target_tokens(pf),
        "metadata": metadata if isinstance(metadata, dict) else {},
    }


def _footer_target_tokens(pf: pq.ParquetFile) -> int | None:
    """Rows minus the null count of log_normalizer_0 from the footer's statistics (None without them)."""
    metadata, total = pf.metadata, 0
    index = next((i for i in range(len(pf.schema)) if pf.schema.column(i).path == "log_normalizer_0"), None)
    if index is None:
        return None
    for g in range(metadata.num_row_groups):
        chunk = metadata.row_group(g).column(index)
        stats = chunk.statistics if chunk.is_stats_set else None
        if stats is None or not stats.has_null_count:
            return None
        total += metadata.row_group(g).num_rows - stats.null_count
    return total


def column_bytes(source: bytes | memoryview | BinaryIO) -> dict[str, int]:
    """Compressed bytes of each top-level column of a shard, summed over row groups (only the footer is read).

    Returns:
        ``{column: bytes}`` in schema order; nested leaves such as ``sample_gaps.list.element`` are summed into their
        top-level column, and the head's byte-plane columns into ``target_gaps`` and ``target_codes``.
    """
    metadata = _open(source).metadata
    sizes: dict[str, int] = {}
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            name = chunk.path_in_schema.split(".")[0]
            if name.startswith(("target_gaps_p", "target_codes_p")):
                name = name.rsplit("_p", 1)[0]
            sizes[name] = sizes.get(name, 0) + int(chunk.total_compressed_size)
    return sizes
