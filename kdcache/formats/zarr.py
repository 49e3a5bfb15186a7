"""Zarr v3 shards (format v2, `output.format: zarr`): one Zarr group per work unit, written whole, shipped as one
zip object (`.zarr.zip`) so the commit protocol is the same as Parquet's (bytes -> sha256 -> one data object ->
exclusive commit record). The only module that imports zarr.

Why a zip: zarr-python's concurrent partial writes to a shared array are unsafe and a missing chunk reads back as
the fill value, so a unit is never written chunk by chunk into a shared store. The group is built in memory and
serialized as an uncompressed (ZIP_STORED) zip whose entry names are the Zarr keys; the chunks inside are already
compressed. `zarr.open_group(zarr.storage.ZipStore(path, mode="r"))` opens a downloaded shard with zarr alone.
Zip entries are sorted with a fixed timestamp, and every chunk is written (``write_empty_chunks``), so the same
input gives the same bytes and a missing chunk is an error, not silent zeros.

Arrays of the group (docs/FORMAT.md is the contract; N tokens, S sequences, M sample entries):

| array          | shape   | dtype      | codecs (writer's choice, recorded in each zarr.json)            |
|----------------|---------|------------|-----------------------------------------------------------------|
| seq_id         | [S]     | int64      | bytes + zstd                                                    |
| seq_offsets    | [S+1]   | int64      | bytes + zstd; sequence s is tokens [seq_offsets[s], [s+1])      |
| input_id       | [N]     | int32      | bytes + blosc(zstd, shuffle)                                    |
| target_gaps    | [N, k]  | uint32     | transpose(1, 0) + bytes + blosc(zstd, bitshuffle)               |
| target_codes   | [N, k]  | codec's    | u8: bytes + zstd; u16/f32: bytes + blosc(zstd, shuffle)         |
| log_normalizers| [N, nT] | float32    | bytes + blosc(zstd, shuffle)                                    |
| tail_logprobs  | [N, nT] | float16    | bytes + blosc(zstd, shuffle)                                    |
| entropy        | [N]     | float16    | bytes + blosc(zstd, shuffle)                                    |
| sample_lengths | [N]     | uint8      | bytes + zstd (unique sampled ids per token)                     |
| sample_gaps    | [M]     | uint32     | bytes + blosc(zstd, bitshuffle)                                 |
| sample_counts  | [M]     | uint8      | bytes + zstd                                                    |
| sample_codes   | [M]     | codec's    | as target_codes                                                 |

Arrays along tokens are chunked by `row_group_tokens` tokens; target_* are absent when k = 0, sample_* when the cache
is not sampled. The group's attributes hold {"kdcache": {...}} like the Parquet key-value metadata.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from kdcache.codec import CodecParams, decode_ids, dequantize_logprobs, gap_planes, values_to_planar
from kdcache.formats.base import BufferedShardWriter, ShardData
from kdcache.formats.rows import RaggedSamples, UnitRows, logprob_table, steps_from_gaps

__all__ = [
    "NAME",
    "SUFFIX",
    "ShardWriter",
    "column_bytes",
    "read_arrays",
    "read_rows",
    "read_shard",
    "read_shard_info",
]

NAME = "zarr"
SUFFIX = ".zarr.zip"
CHUNK_TOKENS = 65536  # tokens per chunk along the token axis
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry timestamp: same input, same bytes


def _codecs(kind: str, itemsize: int, level: int) -> dict[str, Any]:
    """create_array keyword arguments for one array kind (chosen by measurement, see bench/storage.py)."""
    from zarr.codecs import BloscCodec, BloscShuffle, TransposeCodec, ZstdCodec

    clevel = min(9, max(1, (level + 1) // 2))  # blosc's zstd runs at level 2 * clevel - 1
    if kind == "gaps":
        blosc = BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.bitshuffle, typesize=itemsize)
        return {"filters": [TransposeCodec(order=(1, 0))], "compressors": [blosc]}
    if kind == "flat_gaps":
        blosc = BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.bitshuffle, typesize=itemsize)
        return {"filters": [], "compressors": [blosc]}
    if kind == "shuffle" and itemsize > 1:
        blosc = BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.shuffle, typesize=itemsize)
        return {"filters": [], "compressors": [blosc]}
    return {"filters": [], "compressors": [ZstdCodec(level=level)]}


@dataclass
class ShardWriter(BufferedShardWriter):
    """Collects a unit's sequences and produces the zipped Zarr group as bytes (`add` ... `finish`).

    Same constructor and `add` as the Parquet writer; `row_group_tokens` is the chunk length along tokens.
    """

    row_group_tokens: int = CHUNK_TOKENS

    def finish(self) -> bytes:
        """The unit's Zarr group, zipped (ZIP_STORED, sorted entries, fixed timestamps)."""
        import zarr
        from zarr.storage import MemoryStore

        a = self._buffer.arrays()
        n = len(a["input_ids"])
        chunk = max(1, self.row_group_tokens)
        described = {**self.metadata, "k": self.k, "num_samples": self.num_samples, "codec": self.codec.to_dict()}
        entries: dict[str, Any] = {}
        group = zarr.create_group(store=MemoryStore(entries), zarr_format=3, attributes={"kdcache": described})
        level = self.compression_level
        arrays: list[tuple[str, np.ndarray, str]] = [
            ("seq_id", a["seq_ids"], "zstd"),
            ("seq_offsets", np.concatenate([[0], np.cumsum(a["seq_lengths"])]).astype(np.int64), "zstd"),
            ("input_id", a["input_ids"], "shuffle"),
        ]
        if self.k > 0:
            arrays += [("target_gaps", a["gaps"], "gaps"), ("target_codes", a["codes"], "shuffle")]
        arrays += [
            ("log_normalizers", a["log_normalizers"], "shuffle"),
            ("tail_logprobs", a["tail_logprobs"].astype(np.float16), "shuffle"),
            ("entropy", a["entropy"].astype(np.float16), "shuffle"),
        ]
        if self.num_samples > 0:
            arrays += [
                ("sample_lengths", a["sample_lengths"], "zstd"),
                ("sample_gaps", a["sample_gaps"], "flat_gaps"),
                ("sample_counts", a["sample_counts"], "zstd"),
                ("sample_codes", a["sample_codes"], "shuffle"),
            ]
        for name, values, kind in arrays:
            values = np.ascontiguousarray(values)
            if name.startswith("seq_"):
                chunks: tuple[int, ...] = (max(1, len(values)),)
            elif name.startswith("sample_") and name != "sample_lengths":
                chunks = (max(1, min(len(values), chunk * 16)),)
            else:
                chunks = (max(1, min(n, chunk)), *values.shape[1:])
            arr = group.create_array(
                name,
                shape=values.shape,
                chunks=chunks,
                dtype=values.dtype,
                fill_value=0,
                config={"write_empty_chunks": True},
                **_codecs(kind, values.dtype.itemsize, level),
            )
            if values.size:
                arr[...] = values
        return _zip_entries({key: value.to_bytes() for key, value in entries.items()})


def _zip_entries(entries: dict[str, bytes]) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(entries):
            info = zipfile.ZipInfo(key, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, bytes(entries[key]))
    return sink.getvalue()


def _open_group(source: bytes):
    """The zipped group as a read-only zarr Group over an in-memory store (every entry loaded)."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    prototype = default_buffer_prototype()
    with zipfile.ZipFile(io.BytesIO(source)) as zf:
        entries = {name: prototype.buffer.from_bytes(zf.read(name)) for name in zf.namelist()}
    return zarr.open_group(store=MemoryStore(entries, read_only=True), mode="r", zarr_format=3), entries


def read_arrays(source: bytes) -> dict[str, np.ndarray]:
    """Every array of a zipped shard group, as stored (no decoding of gaps or codes)."""
    group, _ = _open_group(bytes(source))
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def _checked_arrays(source: bytes, k: int, codec: CodecParams) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every array of a shard, and its seq_offsets as int64, after checking they agree with each other."""
    a = read_arrays(source)
    offsets = a["seq_offsets"].astype(np.int64)
    n = int(offsets[-1]) if len(offsets) else 0
    if len(a["input_id"]) != n:
        raise ValueError(f"seq_offsets end at {n} but input_id holds {len(a['input_id'])} tokens")
    if k > 0 and (a["target_gaps"].shape != (n, k) or a["target_codes"].dtype != codec.code_dtype):
        raise ValueError(
            f"target arrays are {a['target_gaps'].shape} {a['target_codes'].dtype}; expected [{n}, {k}] "
            f"with {codec.code_dtype} codes ({codec.logprobs})"
        )
    return a, offsets


def _samples(a: dict[str, np.ndarray], codec: CodecParams) -> RaggedSamples | None:
    """The shard's sampled targets, ragged as stored (None when it has no sample arrays)."""
    if "sample_lengths" not in a:
        return None
    offsets = np.concatenate([[0], np.cumsum(a["sample_lengths"], dtype=np.int64)])
    return RaggedSamples(offsets, a["sample_gaps"], a["sample_counts"], a["sample_codes"], codec)


def read_shard(
    source: bytes | memoryview, *, k: int, num_temperatures: int, codec: CodecParams = CodecParams()
) -> ShardData:
    """Decode a whole zipped Zarr shard."""
    a, offsets = _checked_arrays(source, k, codec)
    n = int(offsets[-1]) if len(offsets) else 0
    if k > 0:
        target_ids = decode_ids(a["target_gaps"])
        target_logprobs = dequantize_logprobs(a["target_codes"], codec)
    else:
        target_ids, target_logprobs = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    ragged = _samples(a, codec)
    samples = ragged.padded(0, n) if ragged is not None else (None, None, None)
    return ShardData(
        seq_ids=np.repeat(a["seq_id"].astype(np.int64), np.diff(offsets)),
        input_ids=a["input_id"].astype(np.int32, copy=False),
        target_ids=target_ids,
        target_logprobs=target_logprobs,
        log_normalizers=a["log_normalizers"].reshape(n, num_temperatures),
        tail_logprobs=a["tail_logprobs"].astype(np.float32).reshape(n, num_temperatures),
        entropy=a["entropy"].astype(np.float32),
        sample_ids=samples[0],
        sample_counts=samples[1],
        sample_logprobs=samples[2],
    )


def read_rows(
    source: bytes | memoryview,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    vocab_size: int,
    planar: bool = False,
) -> UnitRows:
    """A shard's rows, compact for batching (`kdcache.formats.rows`): id steps in uint16 when `vocab_size` allows,
    else int32; with `planar`, the gaps as planar bytes (what compact batches ship to the GPU)."""
    a, offsets = _checked_arrays(source, k, codec)
    n = int(offsets[-1]) if len(offsets) else 0
    if k > 0:
        gaps = a["target_gaps"]
        ids = values_to_planar(gaps, gap_planes(gaps)) if planar else steps_from_gaps(gaps, vocab_size)
        codes = a["target_codes"]
    else:
        ids, codes = np.zeros((n, 0), np.uint16), np.zeros((n, 0), codec.code_dtype)
    are_codes = logprob_table(codec) is not None
    return UnitRows(
        starts=offsets[:-1],
        lengths=np.diff(offsets),
        seq_ids=a["seq_id"].astype(np.int64, copy=False),
        input_ids=a["input_id"].astype(np.int32, copy=False),
        target_ids=ids,
        ids_key="target_gap_planes" if planar else "target_steps",
        target_values=codes if are_codes else dequantize_logprobs(codes, codec),
        values_are_codes=are_codes,
        log_normalizers=a["log_normalizers"].reshape(n, num_temperatures),
        tail_logprobs=a["tail_logprobs"].astype(np.float32).reshape(n, num_temperatures),
        entropy=a["entropy"].astype(np.float32),
        samples=_samples(a, codec),
    )


def column_bytes(source: bytes | memoryview | BinaryIO) -> dict[str, int]:
    """Stored bytes of each array of a shard (its chunks and zarr.json), from the zip's central directory only."""
    fileobj = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            if "/" in info.filename:
                name = info.filename.split("/", 1)[0]
                sizes[name] = sizes.get(name, 0) + info.compress_size
    return sizes


def read_shard_info(source: bytes | BinaryIO) -> dict[str, Any]:
    """Counts and self-description from the group's metadata (no chunk is read): bytes or a seekable file, of
    which only the zip's central directory and the zarr.json entries are read.

    Also checks that every chunk the arrays' shapes call for is present in the zip. Returns {"num_tokens",
    "num_sequences", "metadata"}; raises ValueError (or zipfile.BadZipFile) for a shard that cannot be read.
    """
    fileobj = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with zipfile.ZipFile(fileobj) as zf:
        names = set(zf.namelist())
        meta = {name[: -len("/zarr.json")]: json.loads(zf.read(name)) for name in names if name.endswith("/zarr.json")}
        root = json.loads(zf.read("zarr.json"))
    for array, spec in meta.items():
        shape = spec["shape"]
        chunk_shape = spec["chunk_grid"]["configuration"]["chunk_shape"]
        grid = [max(1, -(-s // c)) if s else 0 for s, c in zip(shape, chunk_shape)]
        for index in np.ndindex(*grid):
            key = f"{array}/c/" + "/".join(map(str, index))
            if key not in names:
                raise ValueError(f"array {array!r} lacks chunk {key!r}")
    for name in ("seq_id", "seq_offsets", "input_id"):
        if name not in meta:
            raise ValueError(f"group lacks array {name!r}")
    return {
        "num_tokens": int(meta["input_id"]["shape"][0]),
        "num_sequences": int(meta["seq_id"]["shape"][0]),
        "metadata": root.get("attributes", {}).get("kdcache", {}),
    }
