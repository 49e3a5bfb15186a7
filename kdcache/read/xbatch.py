"""Batches for a student with another tokenizer: each cached teacher sequence re-tokenized by the student, its targets
mapped onto the student's positions and vocabulary (`kdcache.read.xalign`), then collated like any batch.

    cross = CrossTokenizer(teacher_pieces, student_tokenizer, temperatures=[1.0, 2.0])
    seq = cross.sequence(teacher_seq)          # the student's ids and mapped targets for one cached sequence
    arrays = cross.collate([seq, ...], pad_to=None, pad_token_id=0)

A teacher sequence (as `kdcache.formats.rows.UnitRows.sequence` gives it) must carry the text behind its tokens:
`token_text` (the sequence's bytes, uint8) and `token_text_ends` ([T] int64, each token's byte end in it; a token
without text, e.g. a special token, ends where the one before it ends). The student tokenizes that text; a window
that starts or ends inside a multi-byte character (byte-level tokens can split one) loses those bytes. The student's
sequence starts with its own beginning-of-sequence token when the teacher's starts with the teacher's (and the
student's tokenizer adds one), and ends with its end-of-sequence token when the teacher's does.

Batch (on top of `kdcache.read.collate.collate_sequences`' keys, in the student's ids; W = k + 1):
`target_ids` [B, L, W] int64 and `target_logprobs` [B, L, W] float32, the mapped head at T = 1 (of the teacher at
`temperature`, when one is given); `tail_logprob` [B, L] and `tail_logprobs` [B, L, 1], the bucket; `loss_mask`
false where the teacher gives no target; `unmapped_logprobs` [B, L, k] (for `kdcache.losses.uld_loss`);
`xtok_kind` [B, L] int8 (`kdcache.read.xalign.KIND_*`). `log_normalizers` is [B, L, 1] zeros: the batch describes one
temperature, so the losses take it at T = 1 (give the dataset a stored `temperature` to distill at another).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdcache.errors import CacheMismatchError, KdcacheError
from kdcache.pieces import PIECES_KEY, TokenPieces, pieces_from_json, token_pieces, token_spans
from kdcache.read.collate import collate_sequences, cumsum_rows, keep_top_k, stored_temperature_index
from kdcache.read.xalign import KIND_NONE, align_tokens, map_targets, next_token_logprobs
from kdcache.read.xtok import RULES, first_token_of, vocab_map
from kdcache.store import Store

__all__ = ["MAX_PIECES_BYTES", "TEXT_KEYS", "CrossTokenizer", "load_teacher_pieces", "utf8_bounds"]

TEXT_KEYS = ("token_text", "token_text_ends")  # what a cached sequence must carry for a cross-tokenizer student
MAX_PIECES_BYTES = 256 * 2**20  # bound on a cache's piece table before it is read (~3 MB at 150k ids)


def utf8_bounds(text: bytes) -> tuple[int, int]:
    """(start, stop) of the longest run of whole UTF-8 characters at the edges: leading continuation bytes and an
    incomplete last character are left out (a window cut between two byte-level tokens of one character)."""
    start = 0
    while start < min(len(text), 3) and text[start] & 0xC0 == 0x80:
        start += 1
    stop = len(text)
    for back in range(1, min(4, stop - start) + 1):  # the last lead byte and how long its character is
        byte = text[stop - back]
        if byte & 0xC0 == 0x80:
            continue
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        if need > back:
            stop -= back
        break
    return start, stop


class CrossTokenizer:
    """Turns cached teacher sequences into a student's, for one (teacher, student) tokenizer pair.

    Args:
        teacher: the teacher tokenizer's pieces (`kdcache.read.xtok.token_pieces`).
        student_tokenizer: the student's fast tokenizer (a transformers tokenizer with `backend_tokenizer`).
        temperatures: the cache's stored temperatures (index 0 is 1.0).
        temperature: map the teacher at this stored temperature instead of T = 1 (None: 1).
        top_k: keep the teacher's k' most probable head entries (the rest goes to its tail) before mapping.
        logprob_table: decodes `target_codes` (`kdcache.formats.rows.logprob_table`), when sequences carry codes.
        mapping: "exact" (a teacher token's mass goes to the student token with the same bytes, else to the tail
            bucket) or "first" (to the first token the student's tokenizer makes of its bytes); `kdcache.read.xalign`.
        hard_fallback: positions without a teacher target get the student's actual next token (`KIND_HARD`).
        mode, num_samples: the cache's `targets.mode` and N. Sampled ids ("sample", and "hybrid" beside its head)
            enter the map with their importance weights (count / N, times the tail mass in hybrid mode).

    Raises:
        KdcacheError: a tokenizer that is not a fast one or whose pieces cannot be read (`token_pieces`).
        ValueError: a temperature that is not stored (the mapped targets need the exact teacher at T).
    """

    def __init__(
        self,
        teacher: TokenPieces,
        student_tokenizer: Any,
        *,
        temperatures: Sequence[float] = (1.0,),
        temperature: float | None = None,
        top_k: int | None = None,
        logprob_table: np.ndarray | None = None,
        mapping: str = "exact",
        mode: str = "topk",
        num_samples: int = 0,
        hard_fallback: bool = True,
    ):
        if mapping not in RULES:
            raise ValueError(f"mapping must be one of {RULES}, got {mapping!r}")
        if mode != "topk" and (num_samples < 1 or top_k is not None or (temperature or 1.0) != 1.0):
            raise ValueError(f"a {mode!r} cache maps its samples as drawn: give num_samples, no top_k or temperature")
        self.mode, self.num_samples = mode, num_samples
        self.hard_fallback = hard_fallback
        self.mapping = mapping
        self.tokenizer = student_tokenizer
        self.teacher = teacher
        self.student = token_pieces(student_tokenizer)
        self.vmap = vocab_map(teacher, self.student, first_token=first_token_of(student_tokenizer))
        self.temperatures = [float(t) for t in temperatures]
        self.temperature_index = 0
        if temperature is not None and temperature != 1.0:
            index = stored_temperature_index(self.temperatures, temperature)
            if index is None:
                raise ValueError(
                    f"cross-tokenizer targets need a stored temperature; {temperature} is not among the cache's "
                    f"{self.temperatures}"
                )
            self.temperature_index, self.temperature = index, float(temperature)
        self.top_k, self.logprob_table = top_k, logprob_table
        probe = student_tokenizer("a", add_special_tokens=True)["input_ids"]
        self.student_adds_bos = self.student.bos_id is not None and len(probe) > 0 and probe[0] == self.student.bos_id

    @property
    def student_vocab_size(self) -> int:
        return self.student.vocab_size

    def _teacher_entries(self, seq: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The teacher's entries [T, E] with the log of their mass [T, E], the mass outside them [T], and the exact
        log-prob of each position's actual next token [T]: the head (top-k applied, at the wanted temperature) for
        a top-k cache; the sampled ids with log importance weights (after the exact head, in hybrid mode) else."""
        ids, lps, tail = self._teacher_head(seq) if self.mode != "sample" else (None, None, None)
        t_ids = np.asarray(seq["input_ids"], dtype=np.int64)
        if self.mode == "topk":
            return ids, lps, tail, next_token_logprobs(t_ids, ids, lps)
        s_ids = np.asarray(seq["sample_ids"], dtype=np.int64)
        s_lps = np.asarray(seq["sample_logprobs"], dtype=np.float32)
        with np.errstate(divide="ignore"):
            weights = np.log(np.asarray(seq["sample_counts"], dtype=np.float64) / self.num_samples)
            if self.mode == "hybrid":
                weights = weights + tail[:, None]  # draws from the tail, renormalised: times the tail mass
        weights = np.where(np.isfinite(s_lps), weights, -np.inf).astype(np.float32)
        if self.mode == "hybrid":
            s_ids, weights, s_lps = (
                np.concatenate([ids, s_ids], 1),
                np.concatenate([lps, weights], 1),
                np.concatenate([lps, s_lps], 1),
            )
        no_tail = np.full(len(t_ids), -np.inf, dtype=np.float32)  # the weights estimate the whole distribution
        return s_ids, weights, no_tail, next_token_logprobs(t_ids, s_ids, s_lps)

    def _teacher_head(self, seq: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The teacher's head ids [T, k], log-probs [T, k] and tail [T] at the wanted temperature, top-k applied."""
        if "target_ids" in seq:
            ids = np.asarray(seq["target_ids"], dtype=np.int64)
        else:
            steps = seq["target_steps"]
            ids = cumsum_rows(steps, np.empty(steps.shape, dtype=np.int64))
        if "target_logprobs" in seq:
            lps = np.asarray(seq["target_logprobs"], dtype=np.float32)
        else:
            if self.logprob_table is None:
                raise ValueError("CrossTokenizer: sequences carry target_codes; pass their logprob_table")
            lps = self.logprob_table[np.asarray(seq["target_codes"], dtype=np.int64)]
        norms = np.asarray(seq["log_normalizers"], dtype=np.float32)
        tails = np.asarray(seq["tail_logprobs"], dtype=np.float32)
        if self.top_k is not None:
            ids, lps, tails = keep_top_k(ids, lps, tails, norms, self.temperatures, self.top_k)
        j = self.temperature_index
        if j:
            lps = (lps + norms[:, :1]) / np.float32(self.temperature) - norms[:, j : j + 1]
        return ids, lps, tails[:, j]

    def student_tokens(self, text: bytes, *, doc_start: bool, doc_end: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """The student's ids [Ts] int64 for `text`, each token's absolute byte end [Ts] int64, and where the
        student's text starts (past a partial leading character)."""
        start, stop = utf8_bounds(text)
        body = text[start:stop]
        try:
            chars = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KdcacheError(f"cross-tokenizer: the cached text is not UTF-8 at byte {start + exc.start}") from exc
        enc = self.tokenizer(chars, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if doc_start and self.student_adds_bos:
            ids, offsets = [self.student.bos_id, *ids], [(0, 0), *offsets]
        if doc_end and self.student.eos_id is not None:
            ids, offsets = [*ids, self.student.eos_id], [*offsets, (len(chars), len(chars))]
        ends = token_spans(self.student, ids, body, offsets) + start
        return np.asarray(ids, dtype=np.int64), ends, start

    def sequence(self, seq: dict[str, Any]) -> dict[str, Any]:
        """One cached teacher sequence as the student's: ids, mapped targets and masks (see the module docstring).

        Raises:
            KdcacheError: the sequence carries no text (a cache captured without `targets.cross_tokenizer`).
        """
        missing = [key for key in TEXT_KEYS if key not in seq]
        if missing:
            raise KdcacheError(
                f"sequence {int(seq.get('seq_id', -1))} has no {missing[0]!r}: the cache holds no text behind its "
                "tokens; capture it with targets.cross_tokenizer: true to train a student with another tokenizer"
            )
        text = np.asarray(seq["token_text"], dtype=np.uint8)
        t_ends = np.asarray(seq["token_text_ends"], dtype=np.int64)
        t_ids = np.asarray(seq["input_ids"], dtype=np.int64)
        if len(t_ends) != len(t_ids) or (len(t_ends) and int(t_ends[-1]) != len(text)):
            raise KdcacheError(
                f"sequence {int(seq.get('seq_id', -1))}: {len(t_ends)} token text ends for {len(t_ids)} tokens "
                f"covering {int(t_ends[-1]) if len(t_ends) else 0} of {len(text)} text bytes"
            )
        textless = np.diff(np.concatenate([[0], t_ends])) == 0
        doc_start = bool(len(t_ids)) and bool(textless[0]) and int(t_ids[0]) == self.teacher.bos_id
        doc_end = bool(len(t_ids)) and bool(textless[-1]) and int(t_ids[-1]) == self.teacher.eos_id
        s_ids, s_ends, _ = self.student_tokens(text.tobytes(), doc_start=doc_start, doc_end=doc_end)
        head_ids, head_lps, tail, steps = self._teacher_entries(seq)
        alignment = align_tokens(t_ends, s_ends)
        mapped = map_targets(
            self.vmap,
            text,
            alignment,
            t_ids,
            head_ids,
            head_lps,
            tail,
            s_ids,
            t_ends,
            rule=self.mapping,
            hard_fallback=self.hard_fallback,
            next_logprobs=steps,
        )
        entropy = np.asarray(seq["entropy"], dtype=np.float32)
        anchor = alignment.anchor
        # positions the teacher was not asked to teach (a chat's prompt): the student learns nothing there either
        taught = _taught(seq.get("target_mask"), anchor)
        kd_mask = mapped.has_target if taught is None else mapped.has_target & taught
        return {
            "seq_id": seq["seq_id"],
            "input_ids": s_ids,
            "target_ids": mapped.ids,
            "target_logprobs": mapped.logprobs,
            "log_normalizers": np.zeros((len(s_ids), 1), dtype=np.float32),
            "tail_logprobs": mapped.tail_logprob[:, None],
            # the teacher's entropy over its own vocabulary at the anchor (0 where there is none)
            "entropy": np.where(mapped.has_target, entropy[np.maximum(anchor, 0)], 0.0).astype(np.float32),
            "kd_mask": kd_mask,
            "unmapped_logprobs": mapped.unmapped_logprobs,
            "xtok_kind": np.where(kd_mask, mapped.kind, KIND_NONE).astype(np.int8),
        }

    def batch(
        self,
        seqs: Sequence[dict[str, Any] | None],
        batch_index: int,
        sources: Sequence[int],
        *,
        pad_to: int | None = None,
        pad_token_id: int = 0,
    ) -> dict[str, Any]:
        """What `KDCacheDataset` yields for cached teacher sequences (None = a padded row): the student's batch as
        tensors, with `source`, `batch_index`, `temperatures` ([1.0]) and `teacher_vocab_size` (here the student's
        vocabulary, which the mapped ids index)."""
        mapped = [None if s is None else self.sequence(s) for s in seqs]
        arrays = self.collate(mapped, pad_to=pad_to, pad_token_id=pad_token_id)
        out: dict[str, Any] = {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in arrays.items()}
        out["source"] = torch.tensor(list(sources), dtype=torch.int64)
        out["temperatures"] = [1.0]
        out["batch_index"] = torch.tensor(batch_index, dtype=torch.int64)
        out["teacher_vocab_size"] = self.student_vocab_size
        return out

    def collate(
        self, seqs: Sequence[dict[str, Any] | None], *, pad_to: int | None = None, pad_token_id: int = 0
    ) -> dict[str, np.ndarray]:
        """Collate `sequence` outputs (None = a padded row) into batch arrays (module docstring)."""
        # sampled caches give each sequence its own width (its most unique draws): pad every row to the widest
        width = max((s["target_ids"].shape[1] for s in seqs if s is not None), default=(self.top_k or 1) + 1)
        k = width - 1
        seqs = [None if s is None else _widen(s, width) for s in seqs]
        out = collate_sequences(seqs, k=width, num_temperatures=1, pad_to=pad_to, pad_token_id=pad_token_id)
        b, length = out["input_ids"].shape
        kd_mask = np.zeros((b, length), dtype=bool)
        unmapped = np.full((b, length, k), -np.inf, dtype=np.float32)
        kind = np.zeros((b, length), dtype=np.int8)
        for row, seq in enumerate(seqs):
            if seq is None:
                continue
            n = len(seq["input_ids"])
            kd_mask[row, :n] = seq["kd_mask"]
            unmapped[row, :n] = seq["unmapped_logprobs"]
            kind[row, :n] = seq["xtok_kind"]
        out["loss_mask"] = out["loss_mask"] & kd_mask
        out["unmapped_logprobs"] = unmapped
        out["xtok_kind"] = kind
        out["tail_logprob"] = np.ascontiguousarray(out["tail_logprobs"][..., 0])
        return out


def _taught(target_mask: np.ndarray | None, anchor: np.ndarray) -> np.ndarray | None:
    """[Ts] bool: student positions whose anchor is a teacher position with a target (None: every position has one).

    The teacher's target at position t is about token t + 1, and a student position anchored at t reads on into
    that token's bytes, so it is taught exactly where the teacher was (chat: the assistant's tokens)."""
    if target_mask is None:
        return None
    mask = np.asarray(target_mask, dtype=bool)
    if mask.all():
        return None
    return (anchor >= 0) & mask[np.clip(anchor, 0, len(mask) - 1)]  # not all True: len(mask) >= 1


def _widen(seq: dict[str, Any], width: int) -> dict[str, Any]:
    """`seq` with its per-position entry arrays padded to `width` (k = width - 1 unmapped entries)."""
    have = seq["target_ids"].shape[1]
    if have == width:
        return seq
    pad = ((0, 0), (0, width - have))
    return seq | {
        "target_ids": np.pad(seq["target_ids"], pad),
        "target_logprobs": np.pad(seq["target_logprobs"], pad, constant_values=-np.inf),
        "unmapped_logprobs": np.pad(seq["unmapped_logprobs"], pad, constant_values=-np.inf),
    }


def load_teacher_pieces(store: Store, manifest: dict[str, Any]) -> TokenPieces:
    """The teacher tokenizer's pieces a cache stores (`PIECES_KEY`, written by a job with `targets.cross_tokenizer`),
    checked against the tokenizer hash of its manifest.

    Raises:
        KdcacheError: the cache has no piece table (captured without `targets.cross_tokenizer`), or it is malformed
            or larger than `MAX_PIECES_BYTES`.
        CacheMismatchError: the table belongs to another tokenizer than the cache's.
    """
    url = store.url(PIECES_KEY)
    if not store.exists(PIECES_KEY):
        raise KdcacheError(
            f"{url} is missing: the cache was captured without targets.cross_tokenizer, so a student with another "
            "tokenizer cannot be trained from it (recapture with targets.cross_tokenizer: true)"
        )
    size = store.size(PIECES_KEY)
    if size > MAX_PIECES_BYTES:
        raise KdcacheError(f"{url}: {size} bytes, more than a piece table may hold ({MAX_PIECES_BYTES})")
    try:
        obj = json.loads(store.read_bytes(PIECES_KEY))
    except ValueError as exc:
        raise KdcacheError(f"{url}: not JSON ({exc})") from exc
    pieces = pieces_from_json(obj if isinstance(obj, dict) else {}, url)
    expected = str(manifest["fingerprint_inputs"]["tokenizer"]["hash"])
    if pieces.fingerprint != expected:
        raise CacheMismatchError(
            f"{url}: pieces of tokenizer {pieces.fingerprint[:16]}, but the cache's tokenizer is {expected[:16]}"
        )
    return pieces
