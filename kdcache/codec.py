"""Pure encode/decode of per-token targets (numpy only; no I/O). Versioned: see docs/FORMAT.md.

Codec `topk-gap` version 2:

- ids: each row of k distinct ids is sorted ascending and stored as gaps, ``gap[0] = id[0]``,
  ``gap[j] = id[j] - id[j-1] - 1`` (every gap >= 0). Shard formats store the gaps *planar*: the P low-order bytes
  of each gap in P byte planes (plane p holds byte p of every gap of the row), so the near-uniform low bytes and the
  skewed high bytes reach the entropy coder as separate streams (measured 5-7% smaller than interleaved uint32).
- log-probs, one of (``CodecParams.logprobs``), each a table of float32 levels indexed by the stored code:

  - ``u8`` (default): 256 levels over [logprob_min = -24, 0] nats, *companded*: uniform in
    ``y = exp(logprob / compand)`` with ``compand = 6``, so the step grows as the probability falls (0.023 nats near
    log-prob 0, 0.09 at -8, 0.33 at -16). The KL error of an entry is ~p * step^2, so this spends the byte where the
    mass is: renormalized-head KL ~4e-5 nats at T = 1 and at T = 2 on LLM-like heads (bench/storage.py), half the
    KL of a uniform [-16, 0] grid at the same size, and no clipping of the entries a T = 2 student still weighs.
  - ``u16``: 65536 levels uniform in log space over [-32, 0]: error at most 2.4e-4 nats, KL ~5e-9 (near-lossless).
  - ``f32``: the teacher's float32 log-probs unchanged (lossless).

Version 2 (this one) introduced the companded u8 table; version 1 caches (uniform u8 over [-16, 0], float32 side
columns) are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CODEC_NAME",
    "CODEC_VERSION",
    "LOGPROB_CODECS",
    "CodecParams",
    "decode_ids",
    "decode_planar_gaps",
    "dequantize_logprobs",
    "encode_ids",
    "error_bound",
    "gap_planes",
    "planar_to_values",
    "quantize_logprobs",
    "sort_targets",
    "values_to_planar",
]

CODEC_NAME = "topk-gap"
CODEC_VERSION = 2
# name -> (logprob_min in nats, levels, stored little-endian dtype, compand); f32 is not quantized.
# compand 0: levels uniform in log-prob; compand c > 0: levels uniform in exp(logprob / c) (module docstring)
LOGPROB_CODECS: dict[str, tuple[float, int, str, float]] = {
    "u8": (-24.0, 256, "u1", 6.0),
    "u16": (-32.0, 65536, "<u2", 0.0),
    "f32": (0.0, 0, "<f4", 0.0),
}


@dataclass(frozen=True)
class CodecParams:
    """The codec's parameters, recorded in the manifest (fingerprint_inputs.codec) so a reader needs nothing else.

    Attributes:
        logprob_min: lowest representable log-prob in nats (quantized codecs).
        levels: number of quantization levels (0 for f32).
        logprobs: "u8" | "u16" | "f32" (see module docstring).
        compand: 0 for levels uniform in log-prob, c > 0 for levels uniform in exp(logprob / c).
    """

    logprob_min: float = LOGPROB_CODECS["u8"][0]
    levels: int = LOGPROB_CODECS["u8"][1]
    logprobs: str = "u8"
    compand: float = LOGPROB_CODECS["u8"][3]

    def __post_init__(self) -> None:
        if self.logprobs not in LOGPROB_CODECS:
            raise ValueError(f"codec: unknown log-prob coding {self.logprobs!r} (known: {', '.join(LOGPROB_CODECS)})")
        if self.logprobs != "f32" and (
            self.levels < 2 or self.levels > 256**self.code_bytes or self.logprob_min >= 0 or self.compand < 0
        ):
            raise ValueError(
                f"codec: invalid quantization {self.logprob_min} nats / {self.levels} levels / compand {self.compand}"
            )

    @classmethod
    def for_logprobs(cls, name: str) -> CodecParams:
        """The standard parameters of a log-prob coding name ("u8", "u16", "f32")."""
        if name not in LOGPROB_CODECS:
            raise ValueError(f"codec: unknown log-prob coding {name!r} (known: {', '.join(LOGPROB_CODECS)})")
        lo, levels, _, compand = LOGPROB_CODECS[name]
        return cls(logprob_min=lo, levels=levels, logprobs=name, compand=compand)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CodecParams:
        """Parse a manifest's codec section (as written by `to_dict`)."""
        if not str(raw.get("name", CODEC_NAME)).startswith(CODEC_NAME) or raw.get("version", 1) != CODEC_VERSION:
            raise ValueError(
                f"codec: unsupported codec {raw.get('name')!r} version {raw.get('version')!r} (this kdcache reads "
                f"{CODEC_NAME} version {CODEC_VERSION}; re-create the cache with this version)"
            )
        name = raw.get("logprobs", "u8")
        if name == "f32":
            return cls.for_logprobs("f32")
        return cls(
            logprob_min=float(raw["logprob_min"]),
            levels=int(raw["levels"]),
            logprobs=name,
            compand=float(raw.get("compand", 0.0)),
        )

    @property
    def code_dtype(self) -> np.dtype:
        """Stored dtype of one log-prob code (little-endian)."""
        return np.dtype(LOGPROB_CODECS[self.logprobs][2])

    @property
    def code_bytes(self) -> int:
        """Bytes per stored log-prob."""
        return self.code_dtype.itemsize

    @property
    def table(self) -> np.ndarray:
        """The decode table: float32 log-prob of each code, descending from 0 to logprob_min (empty for f32)."""
        return _level_table(self.logprob_min, self.levels, self.compand) if self.logprobs != "f32" else _EMPTY

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": CODEC_NAME,
            "version": CODEC_VERSION,
            "ids": "gap-planar",
            "logprobs": self.logprobs,
        }
        if self.logprobs != "f32":
            out.update(logprob_min=self.logprob_min, levels=self.levels, compand=self.compand)
        return out


_EMPTY = np.zeros(0, dtype=np.float32)
_TABLES: dict[tuple[float, int, float], np.ndarray] = {}


def _level_table(logprob_min: float, levels: int, compand: float) -> np.ndarray:
    """Decode table of a quantized codec, computed in float64 and rounded once to float32 (cached, read-only)."""
    key = (float(logprob_min), int(levels), float(compand))
    table = _TABLES.get(key)
    if table is None:
        code = np.arange(levels, dtype=np.float64)
        if compand > 0:
            y_min = np.exp(logprob_min / compand)
            values = compand * np.log1p(-code * ((1.0 - y_min) / (levels - 1)))
        else:
            values = code * (logprob_min / (levels - 1))
        values[0], values[-1] = 0.0, logprob_min  # exact end points whatever the rounding
        table = values.astype(np.float32)
        table.setflags(write=False)
        _TABLES[key] = table
    return table


def sort_targets(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row's ids ascending and carry the log-probs along. ids/logprobs: [N, k]."""
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[1] > 1 and bool((ids[:, 1:] > ids[:, :-1]).all()):
        return ids, np.asarray(logprobs)  # already ascending (the teacher's order): skip the argsort
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(np.asarray(logprobs), order, axis=1)


def encode_ids(sorted_ids: np.ndarray) -> np.ndarray:
    """Gap-code rows of ascending distinct ids.

    Args:
        sorted_ids: [N, k] integer array, each row strictly ascending and >= 0.

    Returns:
        [N, k] uint32 gaps.

    Raises:
        ValueError: a row is not strictly ascending or holds a negative id.
    """
    ids = np.asarray(sorted_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"encode_ids: expected [N, k] ids, got shape {ids.shape}")
    gaps = np.empty_like(ids)
    gaps[:, :1] = ids[:, :1]
    gaps[:, 1:] = np.diff(ids, axis=1) - 1
    if ids.size and (gaps.min() < 0 or ids.max() >= 2**32):
        raise ValueError("encode_ids: every row must hold distinct ids in ascending order, each in [0, 2**32)")
    return gaps.astype(np.uint32)


def decode_ids(gaps: np.ndarray) -> np.ndarray:
    """Invert `encode_ids`: [N, k] unsigned gaps -> [N, k] int64 ascending ids."""
    g = np.asarray(gaps)
    if g.ndim != 2 or g.shape[-1] == 0:
        return g.astype(np.int64)
    # ids[j] = sum(gaps[:j+1]) + j; the running sum fits uint32 (it is at most the largest id)
    run = g.astype(np.uint32, copy=True)
    np.cumsum(run, axis=1, out=run)
    out = run.astype(np.int64)
    out += np.arange(g.shape[1], dtype=np.int64)
    return out


def gap_planes(gaps: np.ndarray) -> int:
    """Byte planes P needed for these gaps: the smallest P >= 1 with max(gaps) < 256**P."""
    top = int(np.asarray(gaps).max(initial=0))
    return max(1, (top.bit_length() + 7) // 8)


def values_to_planar(values: np.ndarray, planes: int) -> np.ndarray:
    """[N, k] unsigned or float values -> [N, planes * k] uint8, byte p of value j at column p * k + j.

    Bytes are taken little-endian from the value's representation (float32 bit patterns for floats); bytes at
    planes and above must be zero (checked by the caller choosing `planes`).
    """
    v = np.ascontiguousarray(values)
    n, k = v.shape
    width = v.dtype.itemsize
    le = v.astype(v.dtype.newbyteorder("<"), copy=False)
    raw = le.view(np.uint8).reshape(n, k, width)[:, :, :planes]
    return np.ascontiguousarray(raw.transpose(0, 2, 1)).reshape(n, planes * k)


def planar_to_values(
    raw: np.ndarray, k: int, dtype: np.dtype | str = np.uint32, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Invert `values_to_planar`: [N, P * k] uint8 -> [N, k] of `dtype` (uint8/16/32, int32 or float32).

    `out`: optional [N, k] array of `dtype` to write into (returned). Raises ValueError when P exceeds the dtype's
    bytes (the values would not fit).
    """
    dtype = np.dtype(dtype)
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    planes = raw.shape[1] // k if k else 0
    if planes > dtype.itemsize:
        raise ValueError(f"planar_to_values: {planes} byte planes do not fit {dtype}")
    if out is not None and (out.shape != (n, k) or out.dtype != dtype):
        raise ValueError(f"planar_to_values: out must be [{n}, {k}] {dtype}, got {list(out.shape)} {out.dtype}")
    if planes == 1 and dtype.itemsize == 1:
        values = raw.reshape(n, k).view(dtype)
        return values if out is None else _copied(out, values)
    result = np.empty((n, k), dtype=dtype) if out is None else out
    run = result.view(np.dtype(f"u{dtype.itemsize}"))  # assembled as unsigned bits, read as `dtype`
    if planes == 0:
        run[...] = 0
        return result
    planar = raw.reshape(n, planes, k)
    np.copyto(run, planar[:, -1, :])
    for p in range(planes - 2, -1, -1):
        run <<= 8
        run |= planar[:, p, :]
    return result


def _copied(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    np.copyto(out, values)
    return out


_DECODE_BLOCK_VALUES = 2**17  # gaps per pass of decode_planar_gaps: 512 KiB of uint32 scratch stay in the cache


def decode_planar_gaps(
    raw: np.ndarray, k: int, dtype: np.dtype | str = np.int64, *, out: np.ndarray | None = None
) -> np.ndarray:
    """[N, P * k] planar gap bytes -> [N, k] ascending ids (`planar_to_values` + `decode_ids`, fused).

    Args:
        raw: [N, P * k] uint8, plane-major per row (docs/FORMAT.md).
        k: ids per row.
        dtype: of the result: int64 (default), uint32 (ids are < 2**32 by the format) or uint16 (raises ValueError
            if an id does not fit).
        out: optional [N, k] array of `dtype` to write into (returned).

    Rows are decoded in blocks that keep the uint32 scratch in the CPU cache: planes -> gaps, +1 on every gap (one
    contiguous pass), an in-place cumsum along the row, and the -1 fused into the copy into the result: `id[j] =
    sum(gap[:j+1] + 1) - 1 = sum(gap[:j+1]) + j`. Modulo 2**32 throughout, which is exact as every id is < 2**32.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.int64), np.dtype(np.uint32), np.dtype(np.uint16)):
        raise ValueError(f"decode_planar_gaps: dtype must be int64, uint32 or uint16, got {dtype}")
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if out is None:
        out = np.empty((n, k), dtype=dtype)
    elif out.shape != (n, k) or out.dtype != dtype:
        raise ValueError(f"decode_planar_gaps: out must be [{n}, {k}] {dtype}, got {list(out.shape)} {out.dtype}")
    if k == 0 or n == 0:
        return out
    planar = raw.reshape(n, -1, k)
    block = max(1, _DECODE_BLOCK_VALUES // k)
    scratch = None if dtype == np.uint32 else np.empty((min(n, block), k), dtype=np.uint32)  # None: decode in place
    one = np.uint32(1)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        run = out[lo:hi] if scratch is None else scratch[: hi - lo]
        np.copyto(run, planar[lo:hi, -1, :])
        for p in range(planar.shape[1] - 2, -1, -1):
            run <<= 8
            run |= planar[lo:hi, p, :]
        run += one
        np.cumsum(run, axis=1, out=run)
        if dtype == np.uint16 and int(run[:, -1].max()) > 2**16:  # the last id of a row is its largest
            raise ValueError(f"decode_planar_gaps: id {int(run[:, -1].max()) - 1} does not fit uint16")
        np.subtract(run, one, out=run if scratch is None else out[lo:hi], casting="unsafe")
    return out


def quantize_logprobs(logprobs: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] float log-probs (<= 0, -inf allowed) -> [..] codes of `params.code_dtype`; NaN raises ValueError.

    Values below logprob_min take the last code. Uniform codecs round to the nearest level in log-prob; companded ones
    round to the nearest level in y = exp(logprob / compand) (the error is then at most half the local step, plus a
    second-order term). f32 keeps the values (as float32); a -inf log-prob is stored as -inf only by f32.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    if np.isnan(lp).any():
        raise ValueError("quantize_logprobs: NaN log-probabilities (the teacher produced NaN logits)")
    if params.logprobs == "f32":
        return np.minimum(lp, np.float32(0.0)).astype("<f4", copy=False)
    lo, top = params.logprob_min, params.levels - 1
    if params.compand > 0:
        y_min = np.exp(lo / params.compand)
        y = np.exp(np.clip(lp, lo, 0.0) * np.float32(1.0 / params.compand))
        codes = np.rint((1.0 - y) * np.float32(top / (1.0 - y_min)))
    else:
        codes = np.rint(np.clip(-lp, 0.0, -lo) * np.float32(top / -lo))
    return np.clip(codes, 0, top).astype(params.code_dtype)


def dequantize_logprobs(codes: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] codes -> [..] float32 log-probs in [logprob_min, 0] (f32: the stored values): a table look-up."""
    if params.logprobs == "f32":
        return np.asarray(codes).astype(np.float32, copy=False)
    return params.table[np.asarray(codes)]


def error_bound(logprobs: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """Per-value bound on |dequantize(quantize(lp)) - lp| in nats for lp in [logprob_min, 0] (0 for f32).

    The distance from the value's level to the farther of its two decision boundaries (the rounding midpoints, in
    log-prob for uniform codecs and in exp(logprob / compand) for companded ones), plus 1e-6 of float32 slack.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    if params.logprobs == "f32":
        return np.zeros(lp.shape, dtype=np.float32)
    lo, top, c = params.logprob_min, params.levels - 1, params.compand
    half = np.arange(top, dtype=np.float64) + 0.5  # boundary between code i and i + 1
    if c > 0:
        bounds = c * np.log1p(-half * ((1.0 - np.exp(lo / c)) / top))
    else:
        bounds = half * (lo / top)
    table = params.table.astype(np.float64)
    below = np.concatenate([table[:-1] - bounds, [0.0]])
    above = np.concatenate([[0.0], bounds - table[1:]])
    worst = np.maximum(below, above).astype(np.float32)
    return worst[quantize_logprobs(lp, params).astype(np.int64)] + np.float32(1e-6)
