"""Pure encode/decode of per-token targets (numpy only; no I/O). Versioned: see docs/FORMAT.md.

Codec `topk-gap` version 1:

- ids: each row of k distinct ids is sorted ascending and stored as gaps, ``gap[0] = id[0]``,
  ``gap[j] = id[j] - id[j-1] - 1`` (every gap >= 0). Shard formats store the gaps *planar*: the P low-order bytes
  of each gap in P byte planes (plane p holds byte p of every gap of the row), so the near-uniform low bytes and the
  skewed high bytes reach the entropy coder as separate streams (measured 5-7% smaller than interleaved uint32).
- log-probs, one of (``CodecParams.logprobs``):

  - ``u8`` (default): uniform quantization of [logprob_min = -16, 0] nats into 256 levels,
    ``code = round(-clip(logprob, logprob_min, 0) / step)``, ``step = -logprob_min / 255``; decode ``-code * step``.
    Error at most step / 2 = 0.031 nats; values below logprob_min decode to logprob_min (probability < 1.1e-7).
    Renormalized-head KL ~8e-5 nats on LLM-like heads (bench/storage.py).
  - ``u16``: the same over [-32, 0] with 65536 levels: error at most 2.4e-4 nats, KL ~5e-9 (near-lossless).
  - ``f32``: the teacher's float32 log-probs unchanged (lossless).

  Uniform steps in log space are kept on purpose: the error in nats is the same for every entry, so it stays
  bounded by step / (2 T) at any temperature T a student re-normalizes to.
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
    "gap_planes",
    "planar_to_values",
    "quantize_logprobs",
    "sort_targets",
    "values_to_planar",
]

CODEC_NAME = "topk-gap"
CODEC_VERSION = 1
LOGPROB_MIN = -16.0  # nats; the lowest log-prob the default uint8 code represents to half a step
LEVELS = 256
# name -> (logprob_min in nats, levels, stored little-endian dtype); f32 is not quantized
LOGPROB_CODECS: dict[str, tuple[float, int, str]] = {
    "u8": (-16.0, 256, "u1"),
    "u16": (-32.0, 65536, "<u2"),
    "f32": (0.0, 0, "<f4"),
}


@dataclass(frozen=True)
class CodecParams:
    """The codec's parameters, recorded in the manifest (fingerprint_inputs.codec) so a reader needs nothing else.

    Attributes:
        logprob_min: lowest representable log-prob in nats (quantized codecs).
        levels: number of quantization levels (0 for f32).
        logprobs: "u8" | "u16" | "f32" (see module docstring).
    """

    logprob_min: float = LOGPROB_MIN
    levels: int = LEVELS
    logprobs: str = "u8"

    def __post_init__(self) -> None:
        if self.logprobs not in LOGPROB_CODECS:
            raise ValueError(f"codec: unknown log-prob coding {self.logprobs!r} (known: {', '.join(LOGPROB_CODECS)})")
        if self.logprobs != "f32" and (self.levels < 2 or self.levels > 256**self.code_bytes or self.logprob_min >= 0):
            raise ValueError(f"codec: invalid quantization {self.logprob_min} nats / {self.levels} levels")

    @classmethod
    def for_logprobs(cls, name: str) -> CodecParams:
        """The standard parameters of a log-prob coding name ("u8", "u16", "f32")."""
        if name not in LOGPROB_CODECS:
            raise ValueError(f"codec: unknown log-prob coding {name!r} (known: {', '.join(LOGPROB_CODECS)})")
        lo, levels, _ = LOGPROB_CODECS[name]
        return cls(logprob_min=lo, levels=levels, logprobs=name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CodecParams:
        """Parse a manifest's codec section (as written by `to_dict`)."""
        if not str(raw.get("name", CODEC_NAME)).startswith(CODEC_NAME) or raw.get("version", 1) != CODEC_VERSION:
            raise ValueError(f"codec: unsupported codec {raw.get('name')!r} version {raw.get('version')!r}")
        name = raw.get("logprobs", "u8")
        if name == "f32":
            return cls.for_logprobs("f32")
        return cls(logprob_min=float(raw["logprob_min"]), levels=int(raw["levels"]), logprobs=name)

    @property
    def code_dtype(self) -> np.dtype:
        """Stored dtype of one log-prob code (little-endian)."""
        return np.dtype(LOGPROB_CODECS[self.logprobs][2])

    @property
    def code_bytes(self) -> int:
        """Bytes per stored log-prob."""
        return self.code_dtype.itemsize

    @property
    def step(self) -> float:
        """Quantization step in nats (0.0 for f32): the decode error is at most step / 2 inside the range."""
        return 0.0 if self.logprobs == "f32" else -self.logprob_min / (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": CODEC_NAME,
            "version": CODEC_VERSION,
            "ids": "gap-planar",
            "logprobs": self.logprobs,
        }
        if self.logprobs != "f32":
            out.update(logprob_min=self.logprob_min, levels=self.levels)
        return out


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


def planar_to_values(raw: np.ndarray, k: int, dtype: np.dtype | str = np.uint32) -> np.ndarray:
    """Invert `values_to_planar`: [N, P * k] uint8 -> [N, k] of `dtype` (uint8/16/32 or float32)."""
    dtype = np.dtype(dtype)
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    planes = raw.shape[1] // k if k else 0
    if planes == 1 and dtype.itemsize == 1:
        return raw.reshape(n, k).view(dtype)
    acc = np.uint32 if dtype.itemsize == 4 else np.dtype(f"u{dtype.itemsize}")
    planar = raw.reshape(n, planes, k)
    out = np.zeros((n, k), dtype=acc)
    for p in range(planes - 1, -1, -1):
        if p < planes - 1:
            out <<= 8
        out |= planar[:, p, :]
    return out.view(dtype) if dtype.kind == "f" else out.astype(dtype, copy=False)


def decode_planar_gaps(raw: np.ndarray, k: int) -> np.ndarray:
    """[N, P * k] planar gap bytes -> [N, k] int64 ascending ids (`planar_to_values` + `decode_ids`, fused)."""
    raw = np.asarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if k == 0 or n == 0:
        return np.zeros((n, k), dtype=np.int64)
    planar = raw.reshape(n, -1, k)
    run = planar[:, -1, :].astype(np.uint32)
    for p in range(planar.shape[1] - 2, -1, -1):
        run <<= 8
        run |= planar[:, p, :]
    np.cumsum(run, axis=1, out=run)
    out = run.astype(np.int64)
    out += np.arange(k, dtype=np.int64)
    return out


def quantize_logprobs(logprobs: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] float log-probs (<= 0, -inf allowed) -> [..] codes of `params.code_dtype`; NaN raises ValueError.

    f32 keeps the values (as float32); a -inf log-prob is stored as -inf only by f32.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    if np.isnan(lp).any():
        raise ValueError("quantize_logprobs: NaN log-probabilities (the teacher produced NaN logits)")
    if params.logprobs == "f32":
        return np.minimum(lp, np.float32(0.0)).astype("<f4", copy=False)
    codes = np.rint(np.clip(-lp, 0.0, -params.logprob_min) / params.step)
    return codes.astype(params.code_dtype)


def dequantize_logprobs(codes: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] codes -> [..] float32 log-probs in [logprob_min, 0] (f32: the stored values)."""
    if params.logprobs == "f32":
        return np.asarray(codes).astype(np.float32, copy=False)
    out = np.asarray(codes).astype(np.float32)
    out *= np.float32(-params.step)
    return out
