"""The map between a teacher's and a student's vocabularies, by the bytes their tokens stand for (pure; no I/O).

A student with another tokenizer can learn from a teacher's cached distributions only through the text behind the
tokens (`kdcache.pieces`: what each token stands for in bytes). This module holds the vocabulary side of that:

    teacher, student = token_pieces(teacher_tokenizer), token_pieces(student_tokenizer)
    vmap = vocab_map(teacher, student, first_token=first_token_of(student_tokenizer))   # once per pair, reused
    vmap.to_student(ids, "exact")                  # the student id with exactly the same bytes, -1 where none
    vmap.to_student(ids, "first")                  # ... or the first token the student makes of those bytes

The teacher's end-of-sequence and beginning-of-sequence tokens map to the student's by role. The per-sequence
alignment and the mapping of the teacher's targets are in `kdcache.read.xalign`; docs/TARGETS.md ("Students with
another tokenizer") gives the rules. Tokenizers are used duck-typed; this module imports neither transformers nor
tokenizers.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.pieces import TokenPieces, byte_level_decoder, decoder_kinds

__all__ = ["RULES", "FirstToken", "VocabMap", "first_token_of", "vocab_map"]

_MAPS_KEPT = 4  # vocabulary maps kept per process (one per (teacher, student) pair in use)


RULES = ("exact", "first")  # how a teacher token's bytes choose a student token (see `VocabMap`)


@dataclass(frozen=True)
class VocabMap:
    """The map from a teacher's vocabulary to a student's, by bytes (see `vocab_map`), under two rules:

    - "exact": the student id with exactly the same bytes, -1 where the student has none;
    - "first": the first token the student's tokenizer makes of those bytes (its BPE/unigram model on the bytes
      alone); where it cannot tell, the student token with the longest bytes the teacher's begin with.

    Under "first" every teacher token with bytes has a student token (given a byte-complete student vocabulary), so
    the teacher's mass is projected, not left in the tail bucket; the two rules agree wherever the student has the
    teacher's token (and its tokenizer makes it of those bytes).

    Attributes:
        teacher_fingerprint, student_fingerprint: the two tokenizers' content hashes (the map's key).
        teacher_bytes, teacher_offsets: the teacher's pieces concatenated ([total] uint8) and where each id's piece
            lies in it ([Vt + 1] int64; a special token's piece is empty).
        suffixes: rule -> [total] int32, aligned with `teacher_bytes`: at `teacher_offsets[u] + m` the student id
            for teacher piece u without its first m bytes (m = 0: the whole piece), -1 for none.
        by_id: rule -> [Vt] int32, the student id of each teacher id (its piece's entry, and the beginning- and
            end-of-sequence tokens by role).
        student_vocab_size: the student tokenizer's size; shared: teacher ids with an exact student counterpart.
    """

    teacher_fingerprint: str
    student_fingerprint: str
    teacher_bytes: np.ndarray
    teacher_offsets: np.ndarray
    suffixes: dict[str, np.ndarray]
    by_id: dict[str, np.ndarray]
    student_vocab_size: int
    shared: int = field(default=0)

    @property
    def teacher_vocab_size(self) -> int:
        return len(self.teacher_offsets) - 1

    @property
    def teacher_to_student(self) -> np.ndarray:
        """[Vt] int32: the exact student counterpart of every teacher id (-1 where none)."""
        return self.by_id["exact"]

    def piece_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of each teacher id's piece (0 for special tokens and ids past the tokenizer), shaped like ids."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.teacher_vocab_size)
        safe = np.where(inside, ids, 0)
        return np.where(inside, self.teacher_offsets[safe + 1] - self.teacher_offsets[safe], 0)

    def to_student(self, ids: np.ndarray, rule: str = "exact") -> np.ndarray:
        """The student id of each teacher id under `rule` (int64, -1 where none; ids past the tokenizer have none)."""
        table = self.by_id[_check_rule(rule)]
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.teacher_vocab_size)
        return np.where(inside, table[np.where(inside, ids, 0)], -1).astype(np.int64)

    def suffix_to_student(self, ids: np.ndarray, skip: np.ndarray, rule: str = "exact") -> np.ndarray:
        """The student id of each teacher piece without its first `skip` bytes under `rule` (int64, -1 where none
        or where the piece is not longer than `skip`). ids and skip broadcast together."""
        table = self.suffixes[_check_rule(rule)]
        ids, skip = np.broadcast_arrays(np.asarray(ids, dtype=np.int64), np.asarray(skip, dtype=np.int64))
        ok = (skip >= 0) & (skip < self.piece_lengths(ids))
        index = np.where(ok, self.teacher_offsets[np.where(ok, ids, 0)] + skip, 0)
        return np.where(ok, table[index] if len(table) else -1, -1).astype(np.int64)


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown vocabulary rule {rule!r}; choose one of {RULES}")
    return rule


def _student_index(student: TokenPieces) -> dict[bytes, int]:
    """bytes -> student id; where several ids stand for the same bytes, a regular piece wins over a byte-fallback
    or added one (it is the one the tokenizer emits), then the lower id."""
    index: dict[bytes, int] = {}
    for token_id in sorted(range(student.vocab_size), key=lambda i: (student.pieces[i] is None, i)):
        piece = student.pieces[token_id]
        if piece is not None and piece not in index:
            index[piece] = token_id
    return index


def _longest_prefix(text: bytes, index: dict[bytes, int], prefixes: set[bytes]) -> int:
    """The student id of the longest student piece that `text` starts with (-1 if none). `prefixes` holds every
    prefix of every student piece, so the walk stops as soon as no longer piece can match."""
    best, length = -1, 1
    while length <= len(text) and text[:length] in prefixes:
        best = index.get(text[:length], best)
        length += 1
    return best


FirstToken = Callable[[bytes], "int | None"]  # bytes -> the first token a student tokenizer makes of them, or None


def first_token_of(tokenizer: Any) -> FirstToken:
    """A function giving the first token the tokenizer's model (BPE, unigram, ...) makes of some bytes on their own,
    bypassing normalizer and pre-tokenizer (the bytes are one piece of text already): for a byte-level tokenizer the
    bytes in its byte alphabet, for a SentencePiece-style one the text with spaces as "▁". None where it cannot tell
    (bytes that are not UTF-8 for a SentencePiece-style model, or an unknown token)."""
    backend = tokenizer.backend_tokenizer
    model = backend.model
    kinds = decoder_kinds(json.loads(backend.to_str()))
    unk = getattr(tokenizer, "unk_token_id", None)
    if "ByteLevel" in kinds:
        alphabet = {byte: ch for ch, byte in byte_level_decoder().items()}

        def as_model_text(data: bytes) -> str | None:
            return "".join(alphabet[b] for b in data)
    else:

        def as_model_text(data: bytes) -> str | None:
            try:
                return data.decode("utf-8").replace(" ", "▁")
            except UnicodeDecodeError:
                return None

    def first(data: bytes) -> int | None:
        text = as_model_text(data)
        tokens = model.tokenize(text) if text else []
        return None if not tokens or tokens[0].id == unk else int(tokens[0].id)

    return first


def _build_map(teacher: TokenPieces, student: TokenPieces, first_token: FirstToken | None) -> VocabMap:
    index = _student_index(student)
    prefixes = {piece[:n] for piece in index for n in range(1, len(piece) + 1)}
    lengths = np.array([0 if p is None else len(p) for p in teacher.pieces], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    suffixes = {rule: np.full(int(offsets[-1]), -1, dtype=np.int32) for rule in RULES}
    for token_id, piece in enumerate(teacher.pieces):
        if piece is None:
            continue
        base = int(offsets[token_id])
        for skip in range(len(piece)):  # every suffix: what is left of the piece past a student boundary inside it
            rest = piece[skip:]
            suffixes["exact"][base + skip] = index.get(rest, -1)
            first = first_token(rest) if first_token is not None else None
            if first is None or not rest.startswith(student.piece(first) or b"\xff\xff"):
                # the model could not tell (or made a token that is not a prefix of the bytes): the longest prefix
                first = _longest_prefix(rest, index, prefixes)
            suffixes["first"][base + skip] = first
    by_id = {}
    for rule, table in suffixes.items():
        column = np.full(teacher.vocab_size, -1, dtype=np.int32)
        has = lengths > 0
        column[has] = table[offsets[:-1][has]]
        for role in ("bos_id", "eos_id"):  # special tokens stand for no text: matched by role
            t_id, s_id = getattr(teacher, role), getattr(student, role)
            if t_id is not None and s_id is not None and 0 <= t_id < teacher.vocab_size:
                column[t_id] = s_id
        by_id[rule] = column
    joined = b"".join(p for p in teacher.pieces if p is not None)
    return VocabMap(
        teacher_fingerprint=teacher.fingerprint,
        student_fingerprint=student.fingerprint,
        teacher_bytes=np.frombuffer(joined, dtype=np.uint8).copy(),
        teacher_offsets=offsets,
        suffixes=suffixes,
        by_id=by_id,
        student_vocab_size=student.vocab_size,
        shared=int((by_id["exact"] >= 0).sum()),
    )


_MAPS: OrderedDict[tuple[str, str, bool], VocabMap] = OrderedDict()
_MAPS_LOCK = threading.Lock()


def vocab_map(teacher: TokenPieces, student: TokenPieces, *, first_token: FirstToken | None = None) -> VocabMap:
    """The map from the teacher's vocabulary to the student's: computed once per (teacher, student) pair of
    tokenizer contents (their fingerprints) and reused by every later call in the process (the last few pairs are
    kept). `first_token` (`first_token_of(student_tokenizer)`) fills the "first" rule; without it that rule takes
    the longest student prefix everywhere. Building it walks every suffix of every teacher piece (docs/TARGETS.md
    gives timings)."""
    key = (teacher.fingerprint, student.fingerprint, first_token is not None)
    with _MAPS_LOCK:
        if key in _MAPS:
            _MAPS.move_to_end(key)
            return _MAPS[key]
    built = _build_map(teacher, student, first_token)
    with _MAPS_LOCK:
        _MAPS[key] = built
        while len(_MAPS) > _MAPS_KEPT:
            _MAPS.popitem(last=False)
    return built
