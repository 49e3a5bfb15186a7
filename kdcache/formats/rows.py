"""One unit's token rows, held compactly for batching: what every format's `read_rows` returns, format-neutral.

    rows = get_format(name).read_rows(shard_bytes, k=64, num_temperatures=2, codec=codec, vocab_size=V)
    seq = rows.sequence(3)          # views, as `kdcache.read.collate.collate_sequences` takes them
    table = logprob_table(codec)    # codes -> float32 log-probs, for the batch

Compact on purpose. The ids are held as *steps*, `id[0]` then `id[j] - id[j-1]`, assembled from the stored gaps once
per unit in a few whole-array passes (in the prefetch thread, not per sequence), in the smallest dtype that holds
them (uint16 when the padded vocabulary has at most 65,536 ids, else int32): `collate_sequences` turns them into
int64 ids with one fused cumsum straight into the batch. Or, for compact batches, as the planar gap bytes themselves
(`planar=True`), which the losses decode on the GPU. The log-probs stay as the stored codes (uint8 by default) and
are decoded straight into the batch through the codec's table. A unit then costs about (2 or 4 + code bytes) * k +
24 bytes per token (k = 64, V <= 64k: ~216 B) instead of ~12 k bytes for int64 ids and float32 log-probs. Sampled
targets stay ragged as stored (`RaggedSamples`) and are padded per sequence when it is batched.

Positions without a target (`target_mask` False) keep their rows, with zero steps / codes (their content is
undefined: `kdcache.read.collate` overwrites them) and no sample entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.codec import CodecParams, dequantize_logprobs, planar_to_values
from kdcache.formats.base import MAX_TEXT_BYTES_PER_TOKEN, ragged_ids, ragged_to_padded
from kdcache.formats.memory import pooled_empty

__all__ = [
    "RaggedSamples",
    "UnitRows",
    "logprob_table",
    "sequence_bounds",
    "step_work_dtype",
    "steps_from_gaps",
    "steps_in_place",
    "steps_from_planar",
    "text_parts",
]


def logprob_table(codec: CodecParams) -> np.ndarray | None:
    """[levels] float32: the log-prob of every code, from `dequantize_logprobs` itself (so it is the codec's own
    decoding, whatever that is); None for codecs whose codes are the values (f32)."""
    if codec.code_dtype.kind != "u":
        return None
    return np.ascontiguousarray(dequantize_logprobs(np.arange(codec.levels, dtype=codec.code_dtype), codec))


def _step_dtype(vocab_size: int) -> tuple[type, type]:
    """(unsigned dtype the steps are computed in, dtype they are held as) for ids below `vocab_size`."""
    if vocab_size > 2**31:
        raise ValueError(f"padded vocabulary {vocab_size} > 2**31: ids do not fit int32 steps")
    return (np.uint32, np.int32) if vocab_size > 2**16 else (np.uint16, np.uint16)


def _gaps_to_steps(steps: np.ndarray, held: type) -> np.ndarray:
    """In place: gaps -> steps (`id[0]`, then `gap[j] + 1`). In uint16, `id[0] + 1` may wrap; the -1 wraps it back."""
    steps += steps.dtype.type(1)
    steps[:, 0] -= steps.dtype.type(1)
    return steps.view(held)


def step_work_dtype(vocab_size: int) -> np.dtype:
    """The unsigned dtype id steps are computed in for ids below `vocab_size` (uint16 up to 2**16 ids, else uint32);
    a format that assembles gaps itself writes them in this dtype and calls `steps_in_place`."""
    return np.dtype(_step_dtype(vocab_size)[0])


def steps_in_place(gaps: np.ndarray, vocab_size: int) -> np.ndarray:
    """[N, k] gaps in `step_work_dtype(vocab_size)`, an array the caller hands over -> the id steps (a view of it:
    uint16, or int32 above 2**16 ids)."""
    work, held = _step_dtype(vocab_size)
    if gaps.dtype != work:
        raise ValueError(f"steps_in_place: gaps must be {np.dtype(work)} for a vocabulary of {vocab_size}")
    return _gaps_to_steps(gaps, held)


def steps_from_planar(raw: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """[N, P * k] planar gap bytes -> [N, k] id steps (pooled): uint16 when every id is < vocab_size <= 2**16, else
    int32 (vocab_size <= 2**31). Raises ValueError if the gaps have more byte planes than that dtype."""
    work, held = _step_dtype(vocab_size)
    steps = planar_to_values(raw, k, work, out=pooled_empty(raw.shape[:1] + (k,), work))
    return _gaps_to_steps(steps, held)


def steps_from_gaps(gaps: np.ndarray, vocab_size: int) -> np.ndarray:
    """[N, k] gaps (any unsigned dtype) -> [N, k] id steps (pooled), dtypes as `steps_from_planar`."""
    work, held = _step_dtype(vocab_size)
    if gaps.size and int(gaps.max()) >= np.iinfo(work).max:
        raise ValueError(f"a gap of {int(gaps.max())} does not fit the ids of a vocabulary of {vocab_size}")
    steps = pooled_empty(gaps.shape, work)
    steps[...] = gaps
    return _gaps_to_steps(steps, held)


def sequence_bounds(seq_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, seq_ids) of the runs of equal seq_id in a per-token column, in row order."""
    if len(seq_col) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.concatenate([[0], np.flatnonzero(seq_col[1:] != seq_col[:-1]) + 1]).astype(np.int64)
    lengths = np.diff(np.append(starts, len(seq_col)))
    return starts, lengths, seq_col[starts].astype(np.int64)


@dataclass
class RaggedSamples:
    """A unit's sampled targets as stored: for each of N tokens a run of unique sampled ids, their draw counts and
    log-prob codes (M entries in all; token t owns entries [offsets[t], offsets[t + 1]))."""

    offsets: np.ndarray  # [N + 1] int64
    gaps: np.ndarray  # [M] uint32, gap-coded ids, restarting at every token
    counts: np.ndarray  # [M] uint8 draws of each id
    codes: np.ndarray  # [M] log-prob codes (codec dtype)
    codec: CodecParams

    def padded(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens [start, stop) padded to their widest row: ids [n, m] int64 (padding 0), counts [n, m] int32
        (padding 0), log-probs [n, m] float32 (padding -inf)."""
        e0, e1 = int(self.offsets[start]), int(self.offsets[stop])
        lengths = np.diff(self.offsets[start : stop + 1])
        ids = ragged_ids(lengths, self.gaps[e0:e1])
        return (
            ragged_to_padded(lengths, ids, 0),
            ragged_to_padded(lengths, self.counts[e0:e1].astype(np.int32), 0),
            ragged_to_padded(lengths, dequantize_logprobs(self.codes[e0:e1], self.codec), np.float32(-np.inf)),
        )


_ALL_TARGETS = np.ones(0, dtype=bool)  # grown on demand: the mask views of units without masked positions


def _all_true(n: int) -> np.ndarray:
    """A read-only [n] bool array of True (a view of one shared array)."""
    global _ALL_TARGETS
    if len(_ALL_TARGETS) < n:
        grown = np.ones(max(n, 2 * len(_ALL_TARGETS), 4096), dtype=bool)
        grown.setflags(write=False)
        _ALL_TARGETS = grown
    return _ALL_TARGETS[:n]


@dataclass
class UnitRows:
    """A unit's N token rows in S sequences (sequence s is rows [starts[s], starts[s] + lengths[s])).

    `ids_key` names what `target_ids` holds, and is the key a sequence carries them under: "target_steps" (ids =
    cumsum along the row) or "target_gap_planes" (the planar gap bytes [N, P * k] uint8, which compact batches
    decode on the GPU). `target_values` are log-prob codes (decode with `logprob_table`) when `values_are_codes`,
    else float32 log-probs. `target_mask` [N] bool is True where a position carries targets (None: everywhere); the
    target rows of the other positions are placeholders.
    """

    starts: np.ndarray  # [S] int64
    lengths: np.ndarray  # [S] int64
    seq_ids: np.ndarray  # [S] int64
    input_ids: np.ndarray  # [N] int32
    target_ids: np.ndarray  # [N, k] steps (uint16 | int32) or [N, P * k] planar gap bytes
    ids_key: str  # "target_steps" | "target_gap_planes"
    target_values: np.ndarray  # [N, k] codes (uint8 / uint16) or float32 log-probs
    values_are_codes: bool
    log_normalizers: np.ndarray  # [N, nT] float32
    tail_logprobs: np.ndarray  # [N, nT] float32
    entropy: np.ndarray  # [N] float32
    samples: RaggedSamples | None = None
    target_mask: np.ndarray | None = None  # [N] bool; None: every position has targets
    sequence_fields: dict[str, np.ndarray] | None = None  # {name: [S]} (`formats.base.SEQUENCE_FIELDS`), if stored
    text_offsets: np.ndarray | None = None  # [N + 1] int64: token i's text is text_bytes[off[i]:off[i + 1]]
    text_bytes: np.ndarray | None = None  # [B] uint8, the text behind the tokens (read only when asked for)
    text_known: np.ndarray | None = None  # [N] bool: the token's text is stored (False: unknown)

    @property
    def num_sequences(self) -> int:
        return len(self.starts)

    def sequence(self, index: int) -> dict[str, Any]:
        """Sequence `index` (file order) as views: `seq_id`, `input_ids` [T], `target_mask` [T] bool,
        `target_steps` [T, k] (or `target_gap_planes` [T, P * k]), `target_codes` or `target_logprobs` [T, k],
        `log_normalizers` / `tail_logprobs` [T, nT], `entropy` [T], for sampled caches `sample_ids` /
        `sample_counts` / `sample_logprobs` [T, m] (decoded here), each stored sequence field (e.g. `prompt_id`)
        as a scalar, and where the text was read and is known for the whole sequence `token_text` (its bytes,
        uint8) and `token_text_ends` [T] int64 (each token's byte end)."""
        start = int(self.starts[index])
        rows = slice(start, start + int(self.lengths[index]))
        mask = _all_true(rows.stop - start) if self.target_mask is None else self.target_mask[rows]
        seq = {
            "seq_id": self.seq_ids[index],
            "input_ids": self.input_ids[rows],
            "target_mask": mask,
            self.ids_key: self.target_ids[rows],
            "target_codes" if self.values_are_codes else "target_logprobs": self.target_values[rows],
            "log_normalizers": self.log_normalizers[rows],
            "tail_logprobs": self.tail_logprobs[rows],
            "entropy": self.entropy[rows],
        }
        if self.samples is not None:
            seq["sample_ids"], seq["sample_counts"], seq["sample_logprobs"] = self.samples.padded(
                rows.start, rows.stop
            )
        for name, values in (self.sequence_fields or {}).items():
            seq[name] = values[index]
        if self.text_offsets is not None and bool(self.text_known[rows].all()):
            lo, hi = int(self.text_offsets[rows.start]), int(self.text_offsets[rows.stop])
            seq["token_text"] = self.text_bytes[lo:hi]
            seq["token_text_ends"] = self.text_offsets[rows.start + 1 : rows.stop + 1] - lo
        return seq


def text_parts(lengths: np.ndarray, values: np.ndarray, num_tokens: int) -> tuple[np.ndarray, ...]:
    """(offsets [N + 1] int64, bytes [B] uint8, known [N] bool) of a stored token text column from per-token lengths
    (-1 or null: unknown, counted as 0 bytes). Raises ValueError when they do not cover the bytes exactly or exceed
    `MAX_TEXT_BYTES_PER_TOKEN` per token."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (num_tokens,):
        raise ValueError(f"the token text has {len(lengths)} rows, the shard {num_tokens} tokens")
    known = lengths >= 0
    offsets = np.concatenate([[0], np.cumsum(np.where(known, lengths, 0))])
    if int(offsets[-1]) != len(values) or len(values) > MAX_TEXT_BYTES_PER_TOKEN * max(num_tokens, 1):
        raise ValueError(f"the token text holds {len(values)} bytes, its lengths {int(offsets[-1])}")
    return offsets, values, known
