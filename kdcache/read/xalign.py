"""Align a teacher's and a student's tokenization of the same bytes, and map the teacher's cached targets onto the
student's positions and vocabulary (pure numpy; the rules are in docs/TARGETS.md, "Students with another tokenizer").

    al = align_tokens(teacher_ends, student_ends)              # which teacher position each student position reads
    out = map_targets(vmap, text, al, teacher_ids, head_ids, head_logprobs, tail_logprob, student_ids)
    out.ids, out.logprobs, out.tail_logprob                    # [Ts, k + 1], [Ts, k + 1], [Ts]: student ids
    out.has_target, out.kind                                   # which positions got a target, and by which rule

A token's position holds the distribution of the token after it. Both tokenizations cover the same bytes; `ends`
gives each token's byte end (a token without text, e.g. a special token, ends where the one before it ends). Student
position s reads the text up to byte a = student_ends[s]; its *anchor* is the last teacher position whose text ends
at or before a, and its *prefix* the a - teacher_ends[anchor] bytes it has read past the anchor.

- prefix 0 (the boundaries coincide): the anchor's distribution, each teacher token's mass on its student token;
  the rest (teacher ids without one, and the teacher's tail) is the tail bucket. Under `rule="exact"` a teacher
  token's student token has exactly its bytes (exact on the tokens both vocabularies share); under
  `rule="first"` it is the first token the student's tokenizer makes of its bytes (a projection: no mass is left
  out).
- prefix > 0 (inside a teacher token): the anchor's head restricted to the tokens that continue the prefix, each
  standing for the student token of its remaining bytes (by the same rule), renormalised over that part of the
  head (the teacher's tail is left out); no target when no head token continues the prefix.
- the student's next token spans several teacher tokens u1..uj (it ends where uj ends): it gets the teacher's
  probability of that path, p(u1) p(u2 | u1) ..., taken from u1's entry (chain rule, with the cached log-probs of
  the actual tokens u2..uj; only when each of them is cached).

Trailing tokens without text (an end-of-sequence token) are matched to the teacher's by rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.read.xtok import VocabMap

__all__ = [
    "KIND_HARD",
    "KIND_INSIDE",
    "KIND_NONE",
    "KIND_BOUNDARY",
    "KIND_SAME_NEXT",
    "Alignment",
    "Mapped",
    "align_tokens",
]
__all__ += ["map_targets", "next_token_logprobs"]

KIND_NONE = 0  # no teacher target at this position
KIND_SAME_NEXT = 1  # boundaries coincide and the next tokens are the same bytes
KIND_BOUNDARY = 2  # boundaries coincide, the next tokens differ (or the next token is not in the sequence)
KIND_INSIDE = 3  # the position lies inside a teacher token (prefix-conditioned)
KIND_HARD = 4  # no teacher target: the student's actual next token (a hard label)


@dataclass
class Alignment:
    """Which teacher position each student position reads (all [Ts] int64).

    Attributes:
        anchor: the teacher position whose distribution the student position gets, -1 where none.
        prefix: bytes the student has read past the anchor's text (0 where the boundaries coincide).
        path_end: j > anchor + 1 when the student's next token is exactly teacher tokens anchor + 1 .. j, else -1.
        same_next: the student's next token is exactly the teacher's next token (bool).
    """

    anchor: np.ndarray
    prefix: np.ndarray
    path_end: np.ndarray
    same_next: np.ndarray


def _text_end(ends: np.ndarray) -> int:
    """Index past the last token with text (the tokens after it are trailing tokens without text)."""
    grows = np.flatnonzero(np.diff(np.concatenate([[0], ends])) > 0)
    return int(grows[-1]) + 1 if len(grows) else len(ends)


def align_tokens(teacher_ends: np.ndarray, student_ends: np.ndarray) -> Alignment:
    """Align two tokenizations of the same bytes by their byte ends (each [n] non-decreasing, absolute offsets).

    Raises:
        ValueError: ends that decrease.
    """
    t_ends, s_ends = np.asarray(teacher_ends, dtype=np.int64), np.asarray(student_ends, dtype=np.int64)
    for name, ends in (("teacher", t_ends), ("student", s_ends)):
        if len(ends) > 1 and bool((np.diff(ends) < 0).any()):
            raise ValueError(f"{name} token ends must not decrease")
    n_t, n_s = len(t_ends), len(s_ends)
    t_text, s_text = _text_end(t_ends), _text_end(s_ends)
    anchor = np.full(n_s, -1, dtype=np.int64)
    prefix = np.zeros(n_s, dtype=np.int64)
    path_end = np.full(n_s, -1, dtype=np.int64)
    same_next = np.zeros(n_s, dtype=bool)
    # positions up to the student's last text token: the last teacher position (before its trailing tokens) whose
    # text ends at or before the student's
    body = np.arange(s_text)
    found = np.searchsorted(t_ends[:t_text], s_ends[body], side="right") - 1
    anchor[body] = found
    has = found >= 0
    prefix[body[has]] = s_ends[body[has]] - t_ends[found[has]]
    # trailing tokens without text (end of sequence): the teacher's trailing token of the same rank
    rank = np.arange(n_s - s_text)
    anchor[s_text:] = np.where(t_text + rank < n_t, t_text + rank, -1)
    # the student's next token [a, b): the same as the teacher's next token, or exactly the teacher tokens up to j
    s = np.arange(max(n_s - 1, 0))
    s = s[(anchor[s] >= 0) & (s + 1 < s_text)]
    if len(s):
        t = anchor[s]
        b = s_ends[s + 1]
        first_end = np.where(t + 1 < t_text, t_ends[np.minimum(t + 1, max(t_text - 1, 0))], -1)
        same_next[s] = (prefix[s] == 0) & (first_end == b) & (b > s_ends[s])
        j = np.searchsorted(t_ends[:t_text], b, side="left")
        ok = (j < t_text) & (j > t + 1)
        ok[ok] &= t_ends[j[ok]] == b[ok]
        path_end[s[ok]] = j[ok]
    return Alignment(anchor=anchor, prefix=prefix, path_end=path_end, same_next=same_next)


def next_token_logprobs(teacher_ids: np.ndarray, head_ids: np.ndarray, head_logprobs: np.ndarray) -> np.ndarray:
    """[Tt] float64: log p of the teacher's actual next token at each position, from the head; -inf where the next
    token is not in the head, and at the last position (its next token is not in the sequence)."""
    out = np.full(len(teacher_ids), -np.inf)
    if len(teacher_ids) > 1:
        hit = (head_ids[:-1] == np.asarray(teacher_ids)[1:, None]) & np.isfinite(head_logprobs[:-1])
        rows = np.flatnonzero(hit.any(-1))
        out[rows] = head_logprobs[rows, hit[rows].argmax(-1)]
    return out


@dataclass
class Mapped:
    """Targets on the student's positions and vocabulary (Ts student positions, k teacher head entries).

    Attributes:
        ids: [Ts, k + 1] int64 student ids, ascending within a row (0 at padding).
        logprobs: [Ts, k + 1] float32 their probabilities (-inf at padding).
        tail_logprob: [Ts] float32 log of the tail bucket: every other student id (0 where no target: all mass).
        unmapped_logprobs: [Ts, k] float32 the head entries inside the bucket (teacher ids without a student
            counterpart), descending (-inf at padding): what a ULD loss compares with the student's sorted tail.
        has_target: [Ts] bool; kind: [Ts] int8, `KIND_*`.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    unmapped_logprobs: np.ndarray
    has_target: np.ndarray
    kind: np.ndarray


def _prefix_matches(
    vmap: VocabMap, text: np.ndarray, starts: np.ndarray, ids: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """For each pair i: do the first lengths[i] bytes of teacher piece ids[i] equal text[starts[i]:...]? ([P] bool)"""
    if not len(ids):
        return np.zeros(0, dtype=bool)
    total = int(lengths.sum())
    pair = np.repeat(np.arange(len(ids)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    piece = vmap.teacher_bytes[vmap.teacher_offsets[ids[pair]] + within]
    differs = piece != text[starts[pair] + within]
    return np.bincount(pair, weights=differs, minlength=len(ids)) == 0


def map_targets(
    vmap: VocabMap,
    text: np.ndarray,
    alignment: Alignment,
    teacher_ids: np.ndarray,
    head_ids: np.ndarray,
    head_logprobs: np.ndarray,
    tail_logprob: np.ndarray,
    student_ids: np.ndarray,
    teacher_ends: np.ndarray,
    *,
    rule: str = "exact",
    next_logprobs: np.ndarray | None = None,
    hard_fallback: bool = True,
) -> Mapped:
    """Map one sequence's teacher targets onto its student positions (rules in the module docstring).

    Args:
        vmap: the (teacher, student) vocabulary map.
        text: [bytes] uint8, the sequence's text; offsets in `teacher_ends` index it.
        alignment: `align_tokens(teacher_ends, student_ends)`.
        teacher_ids: [Tt] the teacher's input ids.
        head_ids, head_logprobs: [Tt, k] the teacher's entries per position and the log of their mass (-inf at
            padding entries): its exact head, or importance-weighted sampled ids (log of their weights), or both.
            The map is linear in these masses, so sampled weights stay unbiased where the boundaries coincide.
        tail_logprob: [Tt] log of the mass not in the entries (the top-k tail; -inf when the weights hold it all).
        student_ids: [Ts] the student's input ids (the merged path's token is the student's next id).
        teacher_ends: [Tt] the teacher tokens' byte ends.
        rule: how a teacher token (or what is left of it past the prefix) chooses its student token: "exact" (the
            same bytes; none: the tail bucket) or "first" (the first token the student's tokenizer makes of them).
        hard_fallback: a position without a teacher target but with a next student token gets that token with
            probability 1 (`KIND_HARD`), so every position with a label has a target.
        next_logprobs: [Tt] exact log p of the teacher's actual next token at each position (-inf where unknown),
            for the chain rule; default: from `head_ids` / `head_logprobs` (`next_token_logprobs`).

    Returns:
        `Mapped`: every row with a target sums to 1 (mapped entries plus the bucket), up to float32 rounding.
    """
    n_s, k = len(student_ids), head_ids.shape[1]
    width = k + 1
    rows = np.flatnonzero(alignment.anchor >= 0)
    t = alignment.anchor[rows]
    m = alignment.prefix[rows]
    ids = head_ids[t].astype(np.int64)
    lp = head_logprobs[t].astype(np.float64)
    cand = np.isfinite(lp)
    inside = m > 0
    # inside a teacher token: only head tokens longer than the prefix and starting with its bytes continue it
    cand[inside] &= vmap.piece_lengths(ids[inside]) > m[inside, None]
    r, c = np.nonzero(cand & inside[:, None])
    if len(r):
        starts = np.asarray(teacher_ends, dtype=np.int64)[t[r]]
        cand[r, c] = _prefix_matches(vmap, text, starts, ids[r, c], m[r])
    sid = vmap.to_student(ids, rule)
    if inside.any():
        sid[inside] = vmap.suffix_to_student(ids[inside], m[inside, None], rule)
    prob = np.where(cand, np.exp(np.where(cand, lp, 0.0)), 0.0)
    norm = np.where(inside, prob.sum(-1), 1.0)
    ok = norm > 0
    prob[ok] /= norm[ok, None]
    tail = np.where(inside, 0.0, np.exp(np.asarray(tail_logprob, dtype=np.float64)[t]))
    # chain rule: the student's next token = teacher tokens anchor+1..j takes the share of u1's mass that goes on
    # along the path, p(u2 | u1) ... p(uj | ..): exact for an exact head, unbiased for a sampled weight of u1
    extra_rows = extra_ids = extra_prob = np.zeros(0)
    path_end = alignment.path_end[rows]
    merge = np.flatnonzero(ok & (path_end >= 0))
    if len(merge):
        step = next_token_logprobs(teacher_ids, head_ids, head_logprobs) if next_logprobs is None else next_logprobs
        step = np.asarray(step, dtype=np.float64)
        known = np.concatenate([[0], np.cumsum(np.isfinite(step))])
        summed = np.concatenate([[0.0], np.cumsum(np.where(np.isfinite(step), step, 0.0))])
        lo, hi = t[merge] + 1, path_end[merge]  # the path after u1: steps lo .. hi - 1
        u1 = np.asarray(teacher_ids, dtype=np.int64)[lo]
        hit = (ids[merge] == u1[:, None]) & cand[merge]  # u1 is an entry and continues the prefix
        col = np.argmax(hit, axis=-1)
        usable = (known[hi] - known[lo] == hi - lo) & hit[np.arange(len(merge)), col]
        merge, col = merge[usable], col[usable]
        path = prob[merge, col] * np.exp(summed[hi[usable]] - summed[lo[usable]])
        prob[merge, col] -= path
        extra_rows, extra_prob = rows[merge], path
        extra_ids = np.asarray(student_ids, dtype=np.int64)[rows[merge] + 1]
    mapped = cand & (sid >= 0) & (prob > 0)
    unmapped = np.where(cand & (sid < 0), prob, 0.0)
    bucket = tail + unmapped.sum(-1)
    # sum entries per (row, student id): two teacher ids may stand for the same bytes; the merged path adds one
    rr, cc = np.nonzero(mapped)
    key_rows = np.concatenate([rows[rr], extra_rows]).astype(np.int64)
    key_ids = np.concatenate([sid[rr, cc], extra_ids]).astype(np.int64)
    values = np.concatenate([prob[rr, cc], extra_prob])
    keys, inverse = np.unique(key_rows * (vmap.student_vocab_size + 1) + key_ids, return_inverse=True)
    summed_prob = np.bincount(inverse, weights=values, minlength=len(keys))
    out_rows, out_ids = keys // (vmap.student_vocab_size + 1), keys % (vmap.student_vocab_size + 1)
    first = np.searchsorted(out_rows, out_rows, side="left")
    col_of = np.arange(len(keys)) - first
    out_ids_arr = np.zeros((n_s, width), dtype=np.int64)
    out_lp = np.full((n_s, width), -np.inf, dtype=np.float32)
    out_ids_arr[out_rows, col_of] = out_ids
    with np.errstate(divide="ignore"):
        out_lp[out_rows, col_of] = np.log(summed_prob)
        tail_out = np.zeros(n_s, dtype=np.float32)
        tail_out[rows] = np.log(bucket)
        unmapped_sorted = -np.sort(-unmapped, axis=-1)
        unmapped_lp = np.full((n_s, k), -np.inf, dtype=np.float32)
        unmapped_lp[rows] = np.log(unmapped_sorted)
    has_target = np.zeros(n_s, dtype=bool)
    has_target[rows] = ok
    tail_out[~has_target] = 0.0
    out_lp[~has_target] = -np.inf
    out_ids_arr[~has_target] = 0
    unmapped_lp[~has_target] = -np.inf
    kind = np.zeros(n_s, dtype=np.int8)
    kind[rows] = np.where(inside, KIND_INSIDE, np.where(alignment.same_next[rows], KIND_SAME_NEXT, KIND_BOUNDARY))
    kind[~has_target] = KIND_NONE
    if hard_fallback:
        hard = np.flatnonzero(~has_target[: max(n_s - 1, 0)])
        out_ids_arr[hard, 0] = np.asarray(student_ids, dtype=np.int64)[hard + 1]
        out_lp[hard, 0] = 0.0
        tail_out[hard] = -np.inf
        has_target[hard], kind[hard] = True, KIND_HARD
    return Mapped(out_ids_arr, out_lp, tail_out, unmapped_lp, has_target, kind)
