"""Batches of cached targets: padding sequences into `[B, L]` arrays, and the read-time choices (top-k, temperature).

Pure functions on numpy arrays, single-threaded so they do not compete with the training step for torch's threads
(the one torch op, a cumsum, runs on blocks small enough that torch runs it inline in the calling thread); no I/O.
`KDCacheDataset` calls them per batch, then converts to tensors:

    arrays = collate_sequences(seqs, k=64, num_temperatures=2)
    ids, lps, tails = keep_top_k(ids, lps, tails, log_normalizers, temperatures, k=32)
    lps, norms, tails, temps = apply_temperature(lps, norms, tails, temperatures, 2.0)

Conventions (the batch contract of `kdcache.losses`): position t holds the teacher's distribution over the token
after `input_ids[t]`; `labels[t] = input_ids[t + 1]` (-100 at each sequence's last position and at padding); head
entries with log-prob -inf are padding (id 0); `temperatures[0] == 1.0` is the temperature the head is expressed at.
Positions without a teacher target (a cache written with target masks, e.g. a chat's prompt) are `loss_mask` False,
hold what padding holds, and have label -100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdcache.formats.base import SEQUENCE_FIELDS
from kdcache.formats.memory import pooled_empty

__all__ = [
    "IGNORE_INDEX",
    "apply_temperature",
    "collate_sequences",
    "cumsum_rows",
    "keep_top_k",
    "sample_weights",
    "stored_temperature_index",
]

IGNORE_INDEX = -100  # label of positions without a next token
_INLINE_VALUES = 16384  # values per torch call in cumsum_rows: under torch's parallel grain (32768)


def collate_sequences(
    seqs: Sequence[dict[str, Any] | None],
    *,
    k: int,
    num_temperatures: int,
    pad_to: int | None = None,
    pad_token_id: int = 0,
    logprob_table: np.ndarray | None = None,
    compact: bool = False,
) -> dict[str, np.ndarray]:
    """Pad sequences (dicts as `kdcache.read.reader.sequence_dict` makes them; None = a padded row) into batch arrays.

    Every output array is allocated once (the large ones in Arrow's pool: `kdcache.formats.memory.pooled_empty`)
    and written once: rows are copied (ids widened to int64, codes decoded through `logprob_table`) straight into place
    and only the padding is filled.

    Args:
        seqs: B entries; each holds `seq_id`, `input_ids` [T], `target_ids` [T, k] (any integer dtype) or
            `target_steps` [T, k] (uint16 / int32, the ids are their cumsum along the row), either
            `target_logprobs` [T, k] float32 or `target_codes` [T, k] (unsigned codes, see `logprob_table`),
            `log_normalizers`/`tail_logprobs` [T, nT] and `entropy` [T], and optionally `target_mask` (or
            `loss_mask`) [T] bool: the positions that carry targets (default: all). None makes a row with no real
            position.
        pad_to: length L of every batch (a longer sequence raises ValueError); None pads to the longest (>= 1).
        logprob_table: [levels] float32, the log-prob of each code (`kdcache.formats.rows.logprob_table`); needed when
            a sequence carries `target_codes`.
        compact: keep the head as the sequences carry it: `target_gap_planes` [B, L, P * k] uint8 (the stored
            planar gap bytes; P the most planes of the batch's sequences, higher planes 0; 0 at padding) instead of
            `target_ids`, and `target_codes` [B, L, k] (0 at padding) instead of `target_logprobs`, for
            `kdcache.losses.compact.expand_targets` to decode where the batch is used (on the GPU); 3-5 instead of 12
            bytes per entry.
            Sequences that carry decoded ids or log-probs are collated as usual.

    Returns:
        `input_ids`, `attention_mask`, `labels` [B, L] int64 (labels -100 also where a position has no target);
        `loss_mask` [B, L] bool (attention mask AND target mask); `target_ids` [B, L, k] int64
        (0 at padding); `target_logprobs` [B, L, k] float32 (-inf at padding); `log_normalizers`, `tail_logprobs`
        [B, L, nT] float32 (0 at padding: all mass in the tail bucket); `entropy` [B, L] float32; `seq_id` [B] int64
        (-1 for a padded row). Sampled caches add `sample_ids` [B, L, m] int64, `sample_counts` [B, L, m] int32
        (0 = padding) and `sample_logprobs` [B, L, m] float32 (-inf = padding). Generated caches add `prompt_id`
        and `sample_index` [B] int64 (-1 for a padded row or a sequence without them).
    """
    lengths = [0 if s is None else len(s["input_ids"]) for s in seqs]
    longest = max(lengths, default=0)
    if pad_to is not None and longest > pad_to:
        row = lengths.index(longest)
        raise ValueError(f"sequence {int(seqs[row]['seq_id'])} has {longest} tokens, more than pad_to={pad_to}")
    b, length = len(seqs), pad_to if pad_to is not None else max(longest, 1)
    first = next((s for s in seqs if s is not None), {})
    # (output name, dtype) of the head: decoded, or as stored when compact
    id_key, id_dtype, id_width = "target_ids", np.int64, k
    if compact and "target_gap_planes" in first:
        id_key, id_dtype = "target_gap_planes", np.uint8
        id_width = max(s["target_gap_planes"].shape[1] for s in seqs if s is not None)
    lp_key, lp_dtype = ("target_logprobs", np.float32)
    if compact and "target_codes" in first:
        lp_key, lp_dtype = "target_codes", first["target_codes"].dtype
    out = {
        "input_ids": np.full((b, length), pad_token_id, dtype=np.int64),
        id_key: pooled_empty((b, length, id_width), id_dtype),
        lp_key: pooled_empty((b, length, k), lp_dtype),
        "log_normalizers": pooled_empty((b, length, num_temperatures), np.float32),
        "tail_logprobs": pooled_empty((b, length, num_temperatures), np.float32),
        "entropy": pooled_empty((b, length), np.float32),
    }
    # (name, fill at padding) of the [B, L, ...] arrays whose rows are copied from the sequences
    copied = (("log_normalizers", 0.0), ("tail_logprobs", 0.0), ("entropy", 0.0))
    sampled = [s for s in seqs if s is not None and "sample_ids" in s]
    if sampled:
        # width = the most unique ids of any position (valid entries come first in a row): independent of how
        # the shard was decoded (per unit or per sequence), so both formats give identical batches
        width = max(max(int((s["sample_counts"] > 0).sum(axis=1).max(initial=0)) for s in sampled), 1)
        out["sample_ids"] = np.zeros((b, length, width), dtype=np.int64)
        out["sample_counts"] = np.zeros((b, length, width), dtype=np.int32)
        out["sample_logprobs"] = np.full((b, length, width), -np.inf, dtype=np.float32)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        if n < length:
            for name, fill in copied:
                out[name][i, n:] = fill
            out[id_key][i, n:] = 0
            out[lp_key][i, n:] = 0 if lp_key == "target_codes" else -np.inf
        if seq is None:
            continue
        if sampled:
            m = min(seq["sample_ids"].shape[1], width)
            out["sample_ids"][i, :n, :m] = seq["sample_ids"][:, :m]
            out["sample_counts"][i, :n, :m] = seq["sample_counts"][:, :m]
            out["sample_logprobs"][i, :n, :m] = seq["sample_logprobs"][:, :m]
        out["input_ids"][i, :n] = seq["input_ids"]
        for name, _ in copied:
            out[name][i, :n] = seq[name]
        if id_key == "target_gap_planes":
            stored = seq["target_gap_planes"].shape[1]  # planes above this sequence's shard's are 0
            out["target_gap_planes"][i, :n, :stored] = seq["target_gap_planes"]
            out["target_gap_planes"][i, :n, stored:] = 0
        elif "target_steps" in seq:
            cumsum_rows(seq["target_steps"], out["target_ids"][i, :n])
        else:
            out["target_ids"][i, :n] = seq["target_ids"]
        if lp_key == "target_codes":
            out["target_codes"][i, :n] = seq["target_codes"]
        elif "target_codes" in seq:
            if logprob_table is None:
                raise ValueError("collate_sequences: sequences carry target_codes; pass their logprob_table")
            # codes are < len(table) by the codec; "wrap" is the mode that needs no buffering of `out`
            np.take(logprob_table, seq["target_codes"], out=out["target_logprobs"][i, :n], mode="wrap")
        else:
            out["target_logprobs"][i, :n] = seq["target_logprobs"]
    lens, pos = np.asarray(lengths, dtype=np.int64), np.arange(length)
    valid = pos < lens[:, None]
    out["attention_mask"] = valid.astype(np.int64)
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    np.copyto(labels[:, :-1], out["input_ids"][:, 1:], where=pos[:-1] < lens[:, None] - 1)
    # Every cached position carries teacher targets unless the cache masks some (the last one included: the teacher's
    # next-token distribution after the window), so the KD mask is the attention mask AND the target mask.
    loss_mask = valid.copy()
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        mask = None if seq is None else seq.get("target_mask", seq.get("loss_mask"))
        if mask is not None and not mask.all():
            loss_mask[i, :n] = mask
    holes = valid & ~loss_mask
    if holes.any():  # positions without a target hold what padding holds, and no label
        labels[holes] = IGNORE_INDEX
        out[id_key][holes] = 0
        out[lp_key][holes] = 0 if lp_key == "target_codes" else -np.inf
        for name, fill in copied:
            out[name][holes] = fill
        if sampled:
            out["sample_ids"][holes], out["sample_counts"][holes], out["sample_logprobs"][holes] = 0, 0, -np.inf
    out["labels"] = labels
    out["loss_mask"] = loss_mask
    out["seq_id"] = np.array([-1 if s is None else int(s["seq_id"]) for s in seqs], dtype=np.int64)
    for name in SEQUENCE_FIELDS:  # per-sequence fields of generated responses
        if any(s is not None and name in s for s in seqs):
            out[name] = np.array([-1 if s is None else int(s.get(name, -1)) for s in seqs], dtype=np.int64)
    return out


def cumsum_rows(steps: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = cumsum(steps, axis=1) as int64, written into `out` ([T, k] int64, C-contiguous); returns `out`.

    torch's cumsum, ~3x numpy's on rows of k = 64 and fused with the widening, run on blocks of at most
    `_INLINE_VALUES` values: below torch's parallel grain (32768), so it runs in the calling thread and never wakes
    the intra-op thread pool the training step uses (on a busy machine that costs ~100x).
    """
    rows = max(1, _INLINE_VALUES // max(steps.shape[1], 1))
    src, dst = torch.from_numpy(np.ascontiguousarray(steps)), torch.from_numpy(out)
    for lo in range(0, len(steps), rows):
        torch.cumsum(src[lo : lo + rows], 1, dtype=torch.int64, out=dst[lo : lo + rows])
    return out


def stored_temperature_index(temperatures: Sequence[float], temperature: float) -> int | None:
    """Index j with temperatures[j] == temperature (relative tolerance 1e-6), or None."""
    for j, stored in enumerate(temperatures):
        if math.isclose(float(stored), float(temperature), rel_tol=1e-6):
            return j
    return None


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """logsumexp along `axis`; -inf where every entry is -inf (no warning, no NaN)."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak).squeeze(axis)


def keep_top_k(
    target_ids: np.ndarray,
    target_logprobs: np.ndarray,
    tail_logprobs: np.ndarray,
    log_normalizers: np.ndarray,
    temperatures: Sequence[float],
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the k highest head entries per position and fold the dropped mass into the tail at every temperature.

    The ranking is by log-prob at T = 1 (the same at every T, as logits / T keep their order; ties are broken
    arbitrarily but deterministically). Kept entries stay sorted by id. At each stored T_j the dropped entries'
    log-probs are `(lp + Z_1) / T_j - Z_j` and `tail'_j = log(exp(tail_j) + sum exp(dropped_j))`, so the tail stays
    exact (up to the codec's quantization of the dropped head log-probs). numpy, single-threaded: this runs beside
    the training step and must not compete for torch's intra-op threads.

    Args:
        target_ids: [..., K] int64 ascending; target_logprobs: [..., K] float32 at T = 1 (-inf = padding entry).
        tail_logprobs, log_normalizers: [..., nT] float32; temperatures: the nT stored temperatures (index 0 is 1).
        k: entries to keep, 1 <= k <= K.

    Returns:
        target_ids [..., k], target_logprobs [..., k], tail_logprobs [..., nT] (new arrays).
    """
    width = target_logprobs.shape[-1]
    if not 1 <= k <= width:
        raise ValueError(f"top_k must lie in [1, {width}] (the cache's k), got {k}")
    if k == width:
        return target_ids, target_logprobs, tail_logprobs
    top = np.argpartition(-target_logprobs, k - 1, axis=-1)[..., :k]
    top.sort(axis=-1)  # positions ascending, so ids stay ascending
    dropped = target_logprobs.copy()
    np.put_along_axis(dropped, top, -np.inf, axis=-1)
    folded = np.empty_like(tail_logprobs)
    for j, t in enumerate(temperatures):
        at_t = (
            dropped
            if j == 0
            else (dropped + log_normalizers[..., :1]) / np.float32(t) - log_normalizers[..., j : j + 1]
        )
        folded[..., j] = np.logaddexp(tail_logprobs[..., j], _logsumexp(at_t))
    ids = np.take_along_axis(target_ids, top, axis=-1)
    return ids, np.take_along_axis(target_logprobs, top, axis=-1), folded


def apply_temperature(
    target_logprobs: np.ndarray,
    log_normalizers: np.ndarray,
    tail_logprobs: np.ndarray,
    temperatures: Sequence[float],
    temperature: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Express the head at `temperature` T instead of 1, and re-base the stored temperatures on it.

    Exact when T is stored (index j): `lp_T = (lp + Z_1) / T - Z_j` and the tail is `tail_logprobs[..., j]`. The
    result describes the teacher with logits z / T, so the returned `temperatures` are `T_i / T` with T's own entry
    first (1.0) and the normalizers/tails permuted alike: a loss asked for temperature t on this batch gets the
    teacher at t * T, exactly when t * T is stored.

    Not stored: the head is renormalized at T over the valid top-k (`log_softmax(lp / T)`), the tail is -inf and the
    only temperature left is 1.0 (normalizer 0). Callers warn: this is the biased renormalized top-k target.

    Returns:
        target_logprobs [..., k], log_normalizers [..., nT'], tail_logprobs [..., nT'], temperatures (nT' floats).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    inv_t = np.float32(1.0 / temperature)
    j = stored_temperature_index(temperatures, temperature)
    if j is not None:
        order = [j, *[i for i in range(len(temperatures)) if i != j]]
        head = (target_logprobs + log_normalizers[..., :1]) * inv_t - log_normalizers[..., j : j + 1]
        rebased = [float(temperatures[i]) / float(temperature) for i in order]
        return head.astype(np.float32), log_normalizers[..., order], tail_logprobs[..., order], rebased
    scaled = target_logprobs * inv_t  # -inf (padding entries) stays -inf
    with np.errstate(invalid="ignore"):  # -inf - -inf at positions with no valid entry: set to -inf below
        head = (scaled - _logsumexp(scaled)[..., None]).astype(np.float32)
    head[~np.isfinite(head)] = -np.inf
    shape = (*target_logprobs.shape[:-1], 1)
    return head, np.zeros(shape, np.float32), np.full(shape, -np.inf, np.float32), [1.0]


def sample_weights(counts: np.ndarray, tail_logprob: np.ndarray, num_samples: int, *, hybrid: bool) -> np.ndarray:
    """Importance weights of sampled ids, the `sample_weights` of `kdcache.losses.sampled_kl`.

    Mode "sample": count / N (draws from p). Mode "hybrid": tail_mass * count / N (draws from p restricted to the
    ids outside the exact head, renormalized). counts [B, L, m]; tail_logprob [B, L] at T = 1. Returns float32.
    """
    w = counts.astype(np.float32) / np.float32(num_samples)
    if hybrid:
        w = w * np.exp(tail_logprob.astype(np.float32))[..., None]
    return w.astype(np.float32)
