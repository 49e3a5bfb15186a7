"""What the tokens of two tokenizers stand for in bytes, and the map between their vocabularies (pure; no I/O).

A student with another tokenizer can learn from a teacher's cached distributions only through the text behind the
tokens. This module holds the vocabulary side of that:

    teacher = token_pieces(teacher_tokenizer)      # id -> the bytes it stands for (None: a special token)
    student = token_pieces(student_tokenizer)
    vmap = vocab_map(teacher, student)             # computed once per (teacher, student) pair, then reused
    vmap.to_student(ids, "exact")                  # the student id with exactly the same bytes, -1 where none
    vmap.to_student(ids, "first")                  # ... or the first token the student makes of those bytes
    spans = token_spans(student, ids, text, offsets)   # the bytes each token of a tokenization covers

Pieces are compared as bytes, so two tokenizers of different families agree whenever their tokens do: byte-level BPE
("Ġthe"), SentencePiece ("▁the", "<0x0A>" byte fallback) and added tokens all come down to b" the" / b"\\n". Special
tokens stand for no text; the teacher's end-of-sequence and beginning-of-sequence tokens map to the student's by role.
The per-sequence alignment and the mapping of the teacher's targets are in `kdcache.read.xalign`; docs/TARGETS.md
("Students with another tokenizer") gives the rules.

Tokenizers are used duck-typed (a transformers fast tokenizer: `backend_tokenizer`, `all_special_ids`,
`bos_token_id`, `eos_token_id`); this module imports neither transformers nor tokenizers.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.identity import tokenizer_fingerprint

__all__ = ["RULES", "FirstToken", "TokenPieces", "VocabMap", "byte_level_decoder", "first_token_of", "token_pieces"]
__all__ += ["token_spans", "vocab_map"]

_MAPS_KEPT = 4  # vocabulary maps kept per process (one per (teacher, student) pair in use)
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each of the 256 bytes is shown as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, 127-160, 173) are moved, in byte
    order, to the characters from U+0100 on. Returns character -> byte.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, moved = {}, 0
    for byte in range(256):
        if byte in kept:
            table[chr(byte)] = byte
        else:
            table[chr(256 + moved)] = byte
            moved += 1
    return table


@dataclass(frozen=True)
class TokenPieces:
    """The bytes every id of a tokenizer stands for.

    Attributes:
        pieces: index = token id; the bytes the token stands for, or None for a token that stands for no text
            (special and control tokens, unknown ids).
        bos_id, eos_id: the beginning- and end-of-sequence ids (None when the tokenizer has none).
        fingerprint: the tokenizer's content hash (`kdcache.identity.tokenizer_fingerprint`).
        name: a label for messages (the tokenizer's name or path).
    """

    pieces: tuple[bytes | None, ...]
    bos_id: int | None
    eos_id: int | None
    fingerprint: str
    name: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> bytes | None:
        """The bytes of one id; None for a special token or an id past the tokenizer (a padded logit row)."""
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None


def _decoder_kinds(content: dict[str, Any]) -> set[str]:
    """The decoder types of a tokenizer.json (a Sequence decoder contributes each of its parts)."""
    decoder = content.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {str(part.get("type")) for part in parts if part}
    if any(part.get("type") == "Replace" and part.get("pattern", {}).get("String") == "▁" for part in parts if part):
        kinds.add("Metaspace")  # SentencePiece-style: "▁" replaced by a space
    return kinds


def token_pieces(tokenizer: Any) -> TokenPieces:
    """The bytes every id of a fast (Rust-backed) tokenizer stands for.

    Byte-level BPE pieces are decoded through the byte alphabet (`byte_level_decoder`); SentencePiece pieces (a
    Metaspace decoder, or Replace "▁" -> " ") have "▁" read as a space and "<0xHH>" byte-fallback pieces read as
    that byte; added tokens that are not special stand for their own text. Special tokens stand for none.

    Raises:
        KdcacheError: the tokenizer is not a fast one, or its decoder is none of those (its tokens' bytes unknown).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if backend is None:
        raise KdcacheError(
            f"cross-tokenizer: tokenizer {name!r} is not a fast tokenizer; load it with use_fast=True "
            "(the byte offsets and pieces of its tokens are needed)"
        )
    content = json.loads(backend.to_str())
    kinds = _decoder_kinds(content)
    byte_level = "ByteLevel" in kinds
    if not byte_level and "Metaspace" not in kinds:
        raise KdcacheError(
            f"cross-tokenizer: cannot tell which bytes the tokens of {name!r} stand for: its decoder is "
            f"{sorted(kinds) or 'missing'}; supported are ByteLevel (GPT-2/Llama 3/Qwen style) and SentencePiece "
            "style (Metaspace, or Replace '▁' with ByteFallback)"
        )
    alphabet = byte_level_decoder() if byte_level else {}
    added = backend.get_added_tokens_decoder()
    specials = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    specials |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for text, token_id in vocab.items():
        if token_id in specials:
            continue
        if token_id in added:  # added tokens match their content literally in the raw text
            pieces[token_id] = str(added[token_id].content).encode("utf-8")
        elif byte_level:
            try:
                pieces[token_id] = bytes(alphabet[ch] for ch in text)
            except KeyError:
                continue  # a character outside the byte alphabet: the token stands for no known bytes
        else:
            fallback = _BYTE_FALLBACK.match(text)
            pieces[token_id] = bytes([int(fallback.group(1), 16)]) if fallback else text.replace("▁", " ").encode()
    return TokenPieces(
        pieces=tuple(pieces),
        bos_id=getattr(tokenizer, "bos_token_id", None),
        eos_id=getattr(tokenizer, "eos_token_id", None),
        fingerprint=tokenizer_fingerprint(tokenizer)["hash"],
        name=name,
    )


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
    kinds = _decoder_kinds(json.loads(backend.to_str()))
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


def token_spans(
    pieces: TokenPieces,
    ids: Sequence[int],
    text: bytes,
    char_offsets: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Byte end of every token of a tokenization of `text` ([n] int64, non-decreasing, the last text token's is
    `len(text)`): token i covers bytes [ends[i - 1], ends[i]) (ends[-1] = 0), empty for a special token.

    Exact from the pieces when they spell the text (byte-level tokenizers always do; a SentencePiece tokenizer's
    prepended space is dropped from its first token). Otherwise from the tokenizer's character offsets: each token
    covers the text from its start to the next token's start (the first from byte 0), so what the offsets skip (e.g.
    trimmed spaces) belongs to the token before it.

    Raises:
        KdcacheError: neither the pieces spell the text nor are offsets given.
    """
    lengths = np.array([len(pieces.piece(int(i)) or b"") for i in ids], dtype=np.int64)
    spelled = b"".join(pieces.piece(int(i)) or b"" for i in ids)
    if spelled != text and spelled == b" " + text and len(text):
        first = int(np.flatnonzero(lengths)[0])
        lengths[first] -= 1  # the space a SentencePiece tokenizer prepends is not in the text
        spelled = text
    if spelled == text:
        return np.cumsum(lengths)
    if char_offsets is None or len(char_offsets) != len(ids):
        raise KdcacheError(
            f"cross-tokenizer: the pieces of tokenizer {pieces.name!r} do not spell the text and no character "
            "offsets were given"
        )
    chars = text.decode("utf-8")
    byte_at = np.zeros(len(chars) + 1, dtype=np.int64)
    np.cumsum([len(c.encode("utf-8")) for c in chars], out=byte_at[1:])
    has_text = np.array([end > start for start, end in char_offsets], dtype=bool) & (lengths > 0)
    starts = np.array([byte_at[min(start, len(chars))] for start, _ in char_offsets], dtype=np.int64)
    text_rows = np.flatnonzero(has_text)
    ends = np.zeros(len(ids), dtype=np.int64)
    if len(text_rows):
        next_start = np.append(starts[text_rows[1:]], len(text))
        ends[text_rows] = next_start
        ends = np.maximum.accumulate(ends)  # special tokens end where the text before them ends
    return ends
