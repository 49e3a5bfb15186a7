"""Capture-time telemetry: per-token entropy and captured mass, summarized as mergeable fixed-bin histograms.

Pure numpy. Each unit's worker summarizes its tokens (`summarize_tokens`); the driver merges unit summaries
(`merge_summaries`) and the manifest keeps the merged histograms with their mean, std and quantiles
(`describe`). Fixed bins make merging exact: entropy over [0, 16] nats in 64 bins, captured mass over [0, 1] in 50.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ENTROPY_EDGES", "MASS_EDGES", "captured_mass", "describe", "merge_summaries", "summarize_tokens"]

ENTROPY_EDGES = np.linspace(0.0, 16.0, 65)  # nats
MASS_EDGES = np.linspace(0.0, 1.0, 51)  # probability


def captured_mass(head_logprobs: np.ndarray, sample_logprobs: np.ndarray | None = None) -> np.ndarray:
    """[N] probability mass of the stored ids (head plus unique sampled ids) at T = 1."""
    mass = (
        np.exp(head_logprobs.astype(np.float64)).sum(axis=1)
        if head_logprobs.shape[1]
        else np.zeros(len(head_logprobs))
    )
    if sample_logprobs is not None and sample_logprobs.size:
        mass = mass + np.exp(sample_logprobs.astype(np.float64)).sum(axis=1)
    return np.clip(mass, 0.0, 1.0)


def _hist(values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    return {
        "count": int(v.size),
        "sum": float(v.sum()),
        "sum_sq": float((v * v).sum()),
        "min": float(v.min()) if v.size else None,
        "max": float(v.max()) if v.size else None,
        "counts": counts.astype(int).tolist(),
    }


def summarize_tokens(entropy: np.ndarray, mass: np.ndarray) -> dict[str, Any]:
    """Mergeable summary of one unit's tokens: {"entropy": hist, "captured_mass": hist}."""
    return {"entropy": _hist(entropy, ENTROPY_EDGES), "captured_mass": _hist(mass, MASS_EDGES)}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    mins = [x for x in (a["min"], b["min"]) if x is not None]
    maxs = [x for x in (a["max"], b["max"]) if x is not None]
    return {
        "count": a["count"] + b["count"],
        "sum": a["sum"] + b["sum"],
        "sum_sq": a["sum_sq"] + b["sum_sq"],
        "min": min(mins) if mins else None,
        "max": max(maxs) if maxs else None,
        "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
    }


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Merge unit summaries (skipping None); None if there are none."""
    present = [s for s in summaries if s]
    if not present:
        return None
    out = present[0]
    for s in present[1:]:
        out = {key: _merge(out[key], s[key]) for key in out}
    return out


def _quantile(counts: list[int], edges: np.ndarray, q: float) -> float | None:
    total = sum(counts)
    if total == 0:
        return None
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, q * total))
    before = cum[i - 1] if i > 0 else 0
    frac = (q * total - before) / max(counts[i], 1)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))  # linear inside the bin


def describe(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """Merged summary -> {name: {mean, std, min, max, p10, p50, p90, bin_edges, counts}}."""
    if not summary:
        return None
    out = {}
    for name, edges in (("entropy", ENTROPY_EDGES), ("captured_mass", MASS_EDGES)):
        h = summary[name]
        n = max(h["count"], 1)
        mean = h["sum"] / n
        out[name] = {
            "count": h["count"],
            "mean": mean,
            "std": float(np.sqrt(max(h["sum_sq"] / n - mean * mean, 0.0))),
            "min": h["min"],
            "max": h["max"],
            **{f"p{int(q * 100)}": _quantile(h["counts"], edges, q) for q in (0.1, 0.5, 0.9)},
            "bin_edges": [float(e) for e in edges],
            "counts": h["counts"],
        }
    return out
