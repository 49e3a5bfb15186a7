"""Pure encode/decode of per-token top-k targets (numpy only; no I/O). Versioned: see docs/FORMAT.md.

Codec `topk-gap-u8` version 1:
- ids: each row of k ids is sorted ascending and stored as gaps, `gap[0] = id[0]`, `gap[j] = id[j] - id[j-1] - 1`,
  little-endian uint32. Sorted distinct ids make every gap >= 0; small gaps have zero high bytes, which the shard
  format's byte-stream split plus zstd turns into near-zero bytes.
- log-probs: uniform quantization of [LOGPROB_MIN, 0] nats into 256 levels, code = round(-logprob / step), step =
  -LOGPROB_MIN / 255. Decode gives -code * step: error at most step / 2 (0.031 nats) inside the range; values
  below LOGPROB_MIN decode to LOGPROB_MIN (their probability is below 1.1e-7 each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CODEC_NAME",
    "CODEC_VERSION",
    "CodecParams",
    "decode_ids",
    "dequantize_logprobs",
    "encode_ids",
    "quantize_logprobs",
    "sort_targets",
]

CODEC_NAME = "topk-gap-u8"
CODEC_VERSION = 1
LOGPROB_MIN = -16.0  # nats; the lowest log-prob the uint8 code represents exactly to half a step
LEVELS = 256


@dataclass(frozen=True)
class CodecParams:
    """The codec's parameters, recorded in the manifest so a reader needs nothing else."""

    logprob_min: float = LOGPROB_MIN
    levels: int = LEVELS

    @property
    def step(self) -> float:
        """Quantization step in nats."""
        return -self.logprob_min / (self.levels - 1)

    def to_dict(self) -> dict:
        return {"name": CODEC_NAME, "version": CODEC_VERSION, "logprob_min": self.logprob_min, "levels": self.levels}


def sort_targets(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row's ids ascending and carry the log-probs along. ids/logprobs: [N, k]."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)


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
    """Invert `encode_ids`: [N, k] uint32 gaps -> [N, k] int64 ascending ids."""
    g = np.asarray(gaps).astype(np.int64)
    if g.shape[-1] == 0:
        return g
    g[:, 1:] += 1
    return np.cumsum(g, axis=1)


def quantize_logprobs(logprobs: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] float log-probs (<= 0, -inf allowed) -> [..] uint8 codes; NaN raises ValueError."""
    lp = np.asarray(logprobs, dtype=np.float32)
    if np.isnan(lp).any():
        raise ValueError("quantize_logprobs: NaN log-probabilities (the teacher produced NaN logits)")
    codes = np.rint(np.clip(-lp, 0.0, -params.logprob_min) / params.step)
    return codes.astype(np.uint8)


def dequantize_logprobs(codes: np.ndarray, params: CodecParams = CodecParams()) -> np.ndarray:
    """[..] uint8 codes -> [..] float32 log-probs in [logprob_min, 0]."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(-params.step)).astype(np.float32)
