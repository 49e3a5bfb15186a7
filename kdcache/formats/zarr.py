"""Zarr v3 shards (format v3, `output.format: zarr`): one Zarr group per work unit, written whole, shipped as one
zip object (`.zarr.zip`) so the commit protocol is the same as Parquet's (bytes -> sha256 -> one data object ->
exclusive commit record). The only module that imports zarr.

Why a zip: zarr-python's concurrent partial writes to a shared array are unsafe and a missing chunk reads back as
the fill value, so a unit is never written chunk by chunk into a shared store. The group is built in memory and
serialized as an uncompressed (ZIP_STORED) zip whose entry names are the Zarr keys; the chunks inside are already
compressed. `zarr.open_group(zarr.storage.ZipStore(path, mode="r"))` opens a downloaded shard with zarr alone.
Zip entries are sorted with a fixed timestamp, and every chunk is written (``write_empty_chunks``), so the same
input gives the same bytes and a missing chunk is an error, not silent zeros.

Arrays of the group (docs/FORMAT.md is the contract; N tokens, S sequences, R positions with targets, M sample
entries):

| array          | shape   | dtype      | codecs (writer's choice, recorded in each zarr.json)            |
|----------------|---------|------------|-----------------------------------------------------------------|
| seq_id         | [S]     | int64      | bytes + zstd                                                    |
| seq_offsets    | [S+1]   | int64      | bytes + zstd; sequence s is tokens [seq_offsets[s], [s+1])      |
| input_id       | [N]     | int32      | bytes + blosc(zstd, shuffle)                                    |
| target_mask    | [N]     | bool       | bytes + zstd; True at the R positions that carry targets        |
| target_gaps    | [R, k]  | uint32     | transpose(1, 0) + bytes + blosc(zstd, bitshuffle)               |
| target_codes   | [R, k]  | codec's    | u8: bytes + zstd; u16/f32: bytes + blosc(zstd, shuffle)         |
| log_normalizers| [R, nT] | float32    | bytes + blosc(zstd, shuffle)                                    |
| tail_logprobs  | [R, nT] | float16    | bytes + blosc(zstd, shuffle)                                    |
| entropy        | [R]     | float16    | bytes + blosc(zstd, shuffle)                                    |
| sample_lengths | [R]     | uint8      | bytes + zstd (unique sampled ids per target position)           |
| sample_gaps    | [M]     | uint32     | bytes + blosc(zstd, bitshuffle)                                 |
| sample_counts  | [M]     | uint8      | bytes + zstd                                                    |
| sample_codes   | [M]     | codec's    | as target_codes                                                 |
| prompt_id      | [S]     | int64      | bytes + zstd (generated responses: the source record's id)      |
| sample_index   | [S]     | int32      | bytes + zstd (generated responses: which response of the prompt)|
| token_text_lengths | [N] | int32      | bytes + zstd; optional: text bytes of each token, -1 unknown    |
| token_text     | [B]     | uint8      | bytes + zstd; optional: the text behind the tokens, in order    |

Arrays along tokens are chunked by `row_group_tokens` tokens; target_gaps/target_codes are absent when k = 0,
sample_* when the cache is not sampled, prompt_id / sample_index when the sequences are not generated
(`formats.base.SEQUENCE_FIELDS`). The group's attributes hold {"kdcache": {...}} like the Parquet key-value
metadata. The target arrays cover the R target positions only, in order, so positions without a target cost nothing.

Reading never trusts the zip: only the declared arrays' entries are read (unknown entries and arrays are ignored,
never decompressed), every entry must be stored uncompressed in the zip, every array's shape, data type, chunking
and codecs (transpose, bytes, blosc, zstd only) are checked against the layout and the counts the manifest declares,
and each chunk's compressed header must announce exactly the chunk's size before it is decompressed
(`kdcache.formats.limits`). Chunks are decoded with numcodecs directly (zarr's own reader would run them through
its event-loop thread); zarr itself reads these shards too (docs/FORMAT.md, tests/test_format_spec.py).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from kdcache.codec import CodecParams, decode_ids, dequantize_logprobs, gap_planes, values_to_planar
from kdcache.formats.base import (
    MAX_TEXT_BYTES_PER_TOKEN,
    SEQUENCE_FIELDS,
    BufferedShardWriter,
    ShardCounts,
    ShardData,
    expand_rows,
)
from kdcache.formats.limits import compressed_size_claim
from kdcache.formats.memory import pooled_empty
from kdcache.formats.rows import RaggedSamples, UnitRows, logprob_table, steps_from_gaps, text_parts

__all__ = [
    "NAME",
    "SUFFIX",
    "ShardWriter",
    "column_bytes",
    "read_arrays",
    "read_rows",
    "read_shard",
    "read_shard_info",
    "read_token_text",
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
        chunk = max(1, self.row_group_tokens)
        described = {**self.metadata, "k": self.k, "num_samples": self.num_samples, "codec": self.codec.to_dict()}
        entries: dict[str, Any] = {}
        group = zarr.create_group(store=MemoryStore(entries), zarr_format=3, attributes={"kdcache": described})
        level = self.compression_level
        arrays: list[tuple[str, np.ndarray, str]] = [
            ("seq_id", a["seq_ids"], "zstd"),
            ("seq_offsets", np.concatenate([[0], np.cumsum(a["seq_lengths"])]).astype(np.int64), "zstd"),
            ("input_id", a["input_ids"], "shuffle"),
            ("target_mask", a["target_mask"], "zstd"),
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
        arrays += [(name, a[f"field_{name}"], "zstd") for name in self._buffer.sequence_field_names()]
        if self.token_text:
            arrays += [("token_text_lengths", a["text_lengths"], "zstd"), ("token_text", a["text_bytes"], "zstd")]
        for name, values, kind in arrays:
            values = np.ascontiguousarray(values)
            if name.startswith("seq_") or name in SEQUENCE_FIELDS:  # per sequence: one chunk
                chunks: tuple[int, ...] = (max(1, len(values)),)
            elif (name.startswith("sample_") and name != "sample_lengths") or name == "token_text":
                chunks = (max(1, min(len(values), chunk * 16)),)
            else:
                chunks = (max(1, min(len(values), chunk)), *values.shape[1:])
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


_MAX_METADATA_BYTES = 1 << 20  # a zarr.json larger than this is refused
_CODEC_ORDER = {"transpose": 0, "bytes": 1, "blosc": 2, "zstd": 2}


@dataclass(frozen=True)
class _ArraySpec:
    """A declared array's metadata, checked: shape, little-endian dtype, chunk shape, transpose order (or None) and
    compressor ("blosc", "zstd" or None)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    order: tuple[int, ...] | None
    compressor: str | None

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunks, dtype=np.int64)) * self.dtype.itemsize

    def chunk_keys(self) -> list[tuple[tuple[int, ...], str]]:
        grid = [-(-s // c) if s else 0 for s, c in zip(self.shape, self.chunks)]
        return [(index, f"{self.name}/c/" + "/".join(map(str, index))) for index in np.ndindex(*grid)]


class _Shard:
    """A zipped shard group opened for checked reading: entries are read only by name, stored uncompressed."""

    def __init__(self, source: bytes | memoryview | BinaryIO):
        fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            self.zip = zipfile.ZipFile(fileobj)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ValueError(f"not a zip: {exc}") from None
        self.infos = {info.filename: info for info in self.zip.infolist()}

    def entry(self, name: str, limit: int) -> bytes:
        info = self.infos.get(name)
        if info is None:
            raise ValueError(f"lacks the zip entry {name!r}")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise ValueError(f"zip entry {name!r} is compressed (shard entries are stored)")
        if info.file_size > limit:
            raise ValueError(f"zip entry {name!r} holds {info.file_size:,} bytes, more than {limit:,}")
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ValueError(f"zip entry {name!r} cannot be read: {exc}") from None

    def metadata(self, name: str) -> dict[str, Any]:
        key = f"{name}/zarr.json" if name else "zarr.json"
        try:
            meta = json.loads(self.entry(key, _MAX_METADATA_BYTES))
        except (ValueError, RecursionError) as exc:
            if "zip entry" in str(exc) or "lacks" in str(exc):
                raise
            raise ValueError(f"{key!r} is not JSON") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{key!r} is not a JSON object")
        return meta

    def array_spec(self, name: str, dtype: np.dtype | None, shape: tuple[int | None, ...]) -> _ArraySpec:
        """Check array `name`'s metadata: its data type (None: any of the codec dtypes), its shape (None entries: any
        size), a regular chunking no larger than the array, and the codec chain."""
        meta = self.metadata(name)
        where = f"array {name!r}"
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise ValueError(f"{where} is not a plain Zarr v3 array")
        got_shape = meta.get("shape")
        if not isinstance(got_shape, list) or len(got_shape) != len(shape) or not all(_count(s) for s in got_shape):
            raise ValueError(f"{where} has shape {got_shape}, expected {len(shape)} dimensions")
        for got, want in zip(got_shape, shape):
            if want is not None and got != want:
                raise ValueError(f"{where} has shape {got_shape}, expected {list(shape)} (from the manifest)")
        try:
            stored = np.dtype(str(meta.get("data_type")))
        except TypeError:
            raise ValueError(f"{where} has the unknown data type {meta.get('data_type')!r}") from None
        if dtype is not None and stored != dtype:
            raise ValueError(f"{where} is {stored}, expected {dtype}")
        grid = meta.get("chunk_grid") or {}
        chunks = (grid.get("configuration") or {}).get("chunk_shape") if isinstance(grid, dict) else None
        if (
            grid.get("name") != "regular"
            or not isinstance(chunks, list)
            or len(chunks) != len(shape)
            or not all(_count(c) and 1 <= c <= max(s, 1) for c, s in zip(chunks, got_shape))
        ):
            raise ValueError(f"{where} has chunks {chunks}; expected a regular grid no larger than the array")
        encoding = meta.get("chunk_key_encoding") or {}
        if encoding.get("name") != "default" or (encoding.get("configuration") or {}).get("separator", "/") != "/":
            raise ValueError(f"{where} has chunk keys {encoding}; expected the default encoding with '/'")
        order, compressor, endian, last = None, None, None, -1
        for codec in meta.get("codecs") or []:
            codec_name = codec.get("name") if isinstance(codec, dict) else None
            rank = _CODEC_ORDER.get(codec_name, -1)
            if rank <= last:  # unknown, repeated or out of order: transpose? bytes (blosc | zstd)?
                raise ValueError(
                    f"{where} has the codec chain {meta.get('codecs')}; readers take transpose, bytes, "
                    "then blosc or zstd"
                )
            last = rank
            config = codec.get("configuration") or {}
            if codec_name == "transpose":
                order = tuple(config.get("order") or ())
                if sorted(order) != list(range(len(shape))):
                    raise ValueError(f"{where} has the transpose order {list(order)}")
            elif codec_name == "bytes":
                endian = config.get("endian", "little")
            else:
                compressor = codec_name
        if endian is None or (endian != "little" and stored.itemsize > 1):
            raise ValueError(f"{where} lacks a little-endian 'bytes' codec")
        return _ArraySpec(name, tuple(got_shape), stored.newbyteorder("<"), tuple(chunks), order, compressor)

    def read(self, spec: _ArraySpec) -> np.ndarray:
        """The array, decoded chunk by chunk; every chunk must be present and announce exactly its size."""
        out = pooled_empty(spec.shape, spec.dtype)
        expected = spec.chunk_bytes
        encoded_shape = spec.chunks if spec.order is None else tuple(spec.chunks[i] for i in spec.order)
        inverse = None if spec.order is None else tuple(np.argsort(spec.order))
        for index, key in spec.chunk_keys():
            raw = self.entry(key, expected + (expected >> 4) + 4096)  # compressed chunks barely exceed raw ones
            if spec.compressor is not None:
                try:
                    claim = compressed_size_claim(raw, spec.compressor)
                except ValueError as exc:
                    raise ValueError(f"chunk {key!r}: {exc}") from None
                if claim != expected:
                    raise ValueError(
                        f"chunk {key!r} claims {claim:,} bytes uncompressed, its shape holds {expected:,}"
                    )
                raw = _decompress(raw, spec.compressor, key)
            if len(raw) != expected:
                raise ValueError(f"chunk {key!r} holds {len(raw):,} bytes, its shape holds {expected:,}")
            chunk = np.frombuffer(raw, dtype=spec.dtype).reshape(encoded_shape)
            if inverse is not None:
                chunk = chunk.transpose(inverse)
            region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, spec.chunks, spec.shape))
            out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
        return out


def _count(value: Any) -> bool:
    """A JSON count: an int (not a bool) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _decompress(raw: bytes, compressor: str, key: str) -> bytes:
    from numcodecs import Blosc, Zstd

    try:
        return bytes((Blosc() if compressor == "blosc" else Zstd()).decode(raw))
    except Exception as exc:  # numcodecs raises RuntimeError / ValueError for corrupt input
        raise ValueError(f"chunk {key!r} cannot be decompressed: {exc}") from None


_SIDE = ("log_normalizers", "tail_logprobs", "entropy")


def read_arrays(
    source: bytes | memoryview | BinaryIO,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams,
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
    token_text: bool = False,
) -> dict[str, np.ndarray]:
    """The declared arrays of a zipped shard group, as stored (no decoding of gaps or codes), checked against the
    layout and `counts` before each is decompressed; other entries are never read (the optional token text only
    with `token_text`). Raises ValueError."""
    shard = _Shard(source)
    n, s, r = (
        (None, None, None) if counts is None else (counts.num_tokens, counts.num_sequences, counts.num_target_tokens)
    )
    specs = {"seq_id": shard.array_spec("seq_id", np.dtype("<i8"), (s,))}
    s = specs["seq_id"].shape[0]
    specs["seq_offsets"] = shard.array_spec("seq_offsets", np.dtype("<i8"), (s + 1,))
    specs["input_id"] = shard.array_spec("input_id", np.dtype("<i4"), (n,))
    n = specs["input_id"].shape[0]
    specs["target_mask"] = shard.array_spec("target_mask", np.dtype(bool), (n,))
    specs["log_normalizers"] = shard.array_spec("log_normalizers", np.dtype("<f4"), (r, num_temperatures))
    r = specs["log_normalizers"].shape[0]
    if r > n:
        raise ValueError(f"holds {r} target positions but {n} tokens")
    specs["tail_logprobs"] = shard.array_spec("tail_logprobs", np.dtype("<f2"), (r, num_temperatures))
    specs["entropy"] = shard.array_spec("entropy", np.dtype("<f2"), (r,))
    if k > 0:
        specs["target_gaps"] = shard.array_spec("target_gaps", np.dtype("<u4"), (r, k))
        specs["target_codes"] = shard.array_spec("target_codes", codec.code_dtype.newbyteorder("<"), (r, k))
    sampled = ("sample_lengths/zarr.json" in shard.infos) if num_samples is None else num_samples > 0
    if sampled:
        specs["sample_lengths"] = shard.array_spec("sample_lengths", np.dtype("u1"), (r,))
    for name, dtype in SEQUENCE_FIELDS.items():  # optional: generated responses, one value per sequence
        if f"{name}/zarr.json" in shard.infos:
            specs[name] = shard.array_spec(name, dtype.newbyteorder("<"), (s,))
    out = {name: shard.read(spec) for name, spec in specs.items()}
    offsets = out["seq_offsets"]
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any()):
        raise ValueError(f"seq_offsets do not run from 0 to {n} tokens")
    if int(np.count_nonzero(out["target_mask"])) != r:
        raise ValueError(
            f"target_mask marks {int(np.count_nonzero(out['target_mask']))} positions, the target arrays hold {r}"
        )
    if sampled:
        lengths = out["sample_lengths"]
        if len(lengths) and int(lengths.max()) > (num_samples or 255):
            raise ValueError(f"a token holds {int(lengths.max())} sampled ids, more than the draws")
        m = int(lengths.sum(dtype=np.int64))
        for name, dtype in (("sample_gaps", "<u4"), ("sample_counts", "u1"), ("sample_codes", None)):
            want = codec.code_dtype.newbyteorder("<") if dtype is None else np.dtype(dtype)
            out[name] = shard.read(shard.array_spec(name, want, (m,)))
    if token_text:
        out |= _read_text_arrays(shard, n)
    return out


def _read_text_arrays(shard: _Shard, n: int) -> dict[str, np.ndarray]:
    """The token text arrays of a shard of n tokens, the text's size bounded before it is decompressed."""
    lengths = shard.read(shard.array_spec("token_text_lengths", np.dtype("<i4"), (n,)))
    size = int(np.maximum(lengths, 0).sum(dtype=np.int64))
    if size > MAX_TEXT_BYTES_PER_TOKEN * max(n, 1):
        raise ValueError(f"the token text claims {size} bytes for {n} tokens")
    return {
        "token_text_lengths": lengths,
        "token_text": shard.read(shard.array_spec("token_text", np.dtype("u1"), (size,))),
    }


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
    with `token_text`), bounded before it is decompressed; no target array is read (the layout arguments, those of
    every reader, are not needed for that). Raises ValueError."""
    shard = _Shard(source)
    n = shard.array_spec("input_id", np.dtype("<i4"), (None if counts is None else counts.num_tokens,)).shape[0]
    return _text(_read_text_arrays(shard, n), n)


def _samples(a: dict[str, np.ndarray], codec: CodecParams, mask: np.ndarray | None) -> RaggedSamples | None:
    """The shard's sampled targets per token, ragged as stored (None when it has no sample arrays)."""
    if "sample_lengths" not in a:
        return None
    lengths = a["sample_lengths"] if mask is None else expand_rows(mask, a["sample_lengths"], 0)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return RaggedSamples(offsets, a["sample_gaps"], a["sample_counts"], a["sample_codes"], codec)


def _sequence_fields(a: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The shard's per-sequence `SEQUENCE_FIELDS` arrays ([S] each; None when it has none)."""
    return {name: a[name] for name in SEQUENCE_FIELDS if name in a} or None


def _mask(a: dict[str, np.ndarray]) -> np.ndarray | None:
    mask = a["target_mask"]
    return None if len(a["entropy"]) == len(mask) else mask


def _side(a: dict[str, np.ndarray], num_temperatures: int, mask: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """(log_normalizers, tail_logprobs [N, nT], entropy [N]) float32; 0, -inf, 0 where there is no target."""
    if mask is None:
        return a["log_normalizers"], a["tail_logprobs"].astype(np.float32), a["entropy"].astype(np.float32)
    return (
        expand_rows(mask, a["log_normalizers"], 0.0),
        expand_rows(mask, a["tail_logprobs"].astype(np.float32), -np.inf),
        expand_rows(mask, a["entropy"].astype(np.float32), 0.0),
    )


def read_shard(
    source: bytes | memoryview,
    *,
    k: int,
    num_temperatures: int,
    codec: CodecParams = CodecParams(),
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
) -> ShardData:
    """Decode a whole zipped Zarr shard, checked first (arguments as `kdcache.formats.parquet.read_shard`)."""
    a = read_arrays(
        source, k=k, num_temperatures=num_temperatures, codec=codec, num_samples=num_samples, counts=counts
    )
    offsets, mask = a["seq_offsets"], _mask(a)
    n = len(a["input_id"])
    if k > 0:
        target_ids = (
            expand_rows(mask, decode_ids(a["target_gaps"]), -1) if mask is not None else decode_ids(a["target_gaps"])
        )
        lps = dequantize_logprobs(a["target_codes"], codec)
        target_logprobs = lps if mask is None else expand_rows(mask, lps, np.float32(-np.inf))
    else:
        target_ids, target_logprobs = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    ragged = _samples(a, codec, mask)
    samples = ragged.padded(0, n) if ragged is not None else (None, None, None)
    norms, tails, entropy = _side(a, num_temperatures, mask)
    fields = _sequence_fields(a)
    return ShardData(
        seq_ids=np.repeat(a["seq_id"], np.diff(offsets)),
        input_ids=a["input_id"],
        target_ids=target_ids,
        target_logprobs=target_logprobs,
        log_normalizers=norms,
        tail_logprobs=tails,
        entropy=entropy,
        sample_ids=samples[0],
        sample_counts=samples[1],
        sample_logprobs=samples[2],
        target_mask=a["target_mask"],
        sequence_fields=None if fields is None else {k: np.repeat(v, np.diff(offsets)) for k, v in fields.items()},
    )


def read_rows(
    source: bytes | memoryview,
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
    """A shard's rows, compact for batching (`kdcache.formats.rows`): id steps in uint16 when `vocab_size` allows,
    else int32; with `planar`, the gaps as planar bytes (what compact batches ship to the GPU); with `token_text`
    the text behind the tokens too. Checked first."""
    a = read_arrays(
        source,
        k=k,
        num_temperatures=num_temperatures,
        codec=codec,
        num_samples=num_samples,
        counts=counts,
        token_text=token_text,
    )
    offsets, mask = a["seq_offsets"], _mask(a)
    n = len(a["input_id"])
    if k > 0:
        gaps = a["target_gaps"] if mask is None else expand_rows(mask, a["target_gaps"], 0)
        ids = values_to_planar(gaps, gap_planes(gaps)) if planar else steps_from_gaps(gaps, vocab_size)
        codes = a["target_codes"] if mask is None else expand_rows(mask, a["target_codes"], 0)
    else:
        ids, codes = np.zeros((n, 0), np.uint16), np.zeros((n, 0), codec.code_dtype)
    are_codes = logprob_table(codec) is not None
    norms, tails, entropy = _side(a, num_temperatures, mask)
    return UnitRows(
        starts=offsets[:-1],
        lengths=np.diff(offsets),
        seq_ids=a["seq_id"],
        input_ids=a["input_id"],
        target_ids=ids,
        ids_key="target_gap_planes" if planar else "target_steps",
        target_values=codes if are_codes else dequantize_logprobs(codes, codec),
        values_are_codes=are_codes,
        log_normalizers=norms,
        tail_logprobs=tails,
        entropy=entropy,
        samples=_samples(a, codec, mask),
        target_mask=mask,
        sequence_fields=_sequence_fields(a),
        **_text(a, n),
    )


def _text(a: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """UnitRows' text fields from the token text arrays (none when they were not read)."""
    if "token_text_lengths" not in a:
        return {}
    offsets, values, known = text_parts(a["token_text_lengths"], a["token_text"], n)
    return {"text_offsets": offsets, "text_bytes": values, "text_known": known}


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


def read_shard_info(
    source: bytes | BinaryIO,
    *,
    k: int | None = None,
    num_temperatures: int = 1,
    codec: CodecParams | None = None,
    num_samples: int | None = None,
    counts: ShardCounts | None = None,
) -> dict[str, Any]:
    """Counts and self-description from the group's metadata (no chunk is read): bytes or a seekable file, of
    which only the zip's central directory and the zarr.json entries are read.

    Also checks that every chunk the arrays' shapes call for is present in the zip, and with the layout (`k`,
    `num_temperatures`, `codec`, `num_samples`) and `counts` every declared array's metadata as readers check it.
    Returns {"num_tokens", "num_sequences", "num_target_tokens", "metadata"}; raises ValueError for a shard that
    cannot be read.
    """
    shard = _Shard(source)
    root = shard.metadata("")
    names = sorted(name[: -len("/zarr.json")] for name in shard.infos if name.endswith("/zarr.json"))
    for name in ("seq_id", "seq_offsets", "input_id", "target_mask", "log_normalizers"):
        if name not in names:
            raise ValueError(f"group lacks array {name!r}")
    specs: dict[str, _ArraySpec] = {}
    if k is None:  # no layout: every array as it describes itself
        for name in names:
            shape = shard.metadata(name).get("shape")
            specs[name] = shard.array_spec(name, None, (None,) * (len(shape) if isinstance(shape, list) else 0))
    if k is not None:
        n = None if counts is None else counts.num_tokens
        s = None if counts is None else counts.num_sequences
        r = None if counts is None else counts.num_target_tokens
        codec = codec or CodecParams()
        specs["seq_id"] = shard.array_spec("seq_id", np.dtype("<i8"), (s,))
        specs["seq_offsets"] = shard.array_spec("seq_offsets", np.dtype("<i8"), (specs["seq_id"].shape[0] + 1,))
        specs["input_id"] = shard.array_spec("input_id", np.dtype("<i4"), (n,))
        specs["target_mask"] = shard.array_spec("target_mask", np.dtype(bool), (specs["input_id"].shape[0],))
        specs["log_normalizers"] = shard.array_spec("log_normalizers", np.dtype("<f4"), (r, num_temperatures))
        r = specs["log_normalizers"].shape[0]
        specs["tail_logprobs"] = shard.array_spec("tail_logprobs", np.dtype("<f2"), (r, num_temperatures))
        specs["entropy"] = shard.array_spec("entropy", np.dtype("<f2"), (r,))
        if k > 0:
            specs["target_gaps"] = shard.array_spec("target_gaps", np.dtype("<u4"), (r, k))
            specs["target_codes"] = shard.array_spec("target_codes", codec.code_dtype.newbyteorder("<"), (r, k))
        if num_samples:
            specs["sample_lengths"] = shard.array_spec("sample_lengths", np.dtype("u1"), (r,))
            for name, dtype in (("sample_gaps", "<u4"), ("sample_counts", "u1")):
                specs[name] = shard.array_spec(name, np.dtype(dtype), (None,))
            specs["sample_codes"] = shard.array_spec("sample_codes", codec.code_dtype.newbyteorder("<"), (None,))
    for spec in specs.values():
        for _, key in spec.chunk_keys():
            if key not in shard.infos:
                raise ValueError(f"array {spec.name!r} lacks chunk {key!r}")
    attributes = root.get("attributes") if isinstance(root.get("attributes"), dict) else {}
    metadata = attributes.get("kdcache")
    return {
        "num_tokens": specs["input_id"].shape[0],
        "num_sequences": specs["seq_id"].shape[0],
        "num_target_tokens": specs["log_normalizers"].shape[0],
        "metadata": metadata if isinstance(metadata, dict) else {},
    }
