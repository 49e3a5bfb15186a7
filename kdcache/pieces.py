"""What the tokens of a tokenizer stand for in bytes, and which bytes of a text each token covers (pure; no I/O).

    pieces = token_pieces(tokenizer)            # id -> the bytes it stands for (None: a special token)
    ends = token_spans(pieces, ids, text)       # byte end of every token of a tokenization of `text`
    text, ends = spelled_text(pieces, ids)      # the bytes a sequence of ids stands for, and each token's end
    pieces_to_json(pieces) / pieces_from_json(obj)  # the form a cache stores them in

Pieces are compared as bytes, so two tokenizers of different families agree whenever their tokens do: byte-level BPE
("Ġthe"), SentencePiece ("▁the", "<0x0A>" byte fallback) and added tokens all come down to b" the" / b"\\n". Special
tokens stand for no text. Capture uses this to record the text behind every teacher token
(`targets.cross_tokenizer`), the reader to map the teacher's targets onto a student with another tokenizer
(`kdcache.read.xtok`, docs/TARGETS.md "Students with another tokenizer").

Tokenizers are used duck-typed (a transformers fast tokenizer: `backend_tokenizer`, `all_special_ids`,
`bos_token_id`, `eos_token_id`); this module imports neither transformers nor tokenizers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.identity import tokenizer_fingerprint

__all__ = [
    "PIECES_KEY",
    "TokenPieces",
    "byte_level_decoder",
    "decoder_kinds",
    "pieces_from_json",
    "pieces_to_json",
    "spelled_text",
    "token_pieces",
    "token_spans",
]

PIECES_KEY = "tokenizer_pieces.json"  # a cache's teacher piece table (`pieces_to_json`), beside index.json
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_MAX_PIECES = 1 << 24  # ids a stored piece table may hold (a bound before allocating; vocabularies are ~10^5)


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


def decoder_kinds(content: dict[str, Any]) -> set[str]:
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
    kinds = decoder_kinds(content)
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


def spelled_text(pieces: TokenPieces, ids: Sequence[int] | np.ndarray) -> tuple[bytes, np.ndarray]:
    """The bytes `ids` stand for (their pieces, concatenated; special tokens stand for none) and each token's byte
    end in them ([n] int64): the text behind a sequence that has no source text (pre-tokenized ids, a rendered
    chat, a generated response)."""
    spelled = [pieces.piece(int(i)) or b"" for i in np.asarray(ids).tolist()]
    return b"".join(spelled), np.cumsum([len(p) for p in spelled], dtype=np.int64)


def pieces_to_json(pieces: TokenPieces) -> dict[str, Any]:
    """A JSON-able form of `pieces` (bytes as hex, None for tokens without text)."""
    return {
        "fingerprint": pieces.fingerprint,
        "name": pieces.name,
        "bos_id": pieces.bos_id,
        "eos_id": pieces.eos_id,
        "pieces": [None if p is None else p.hex() for p in pieces.pieces],
    }


def pieces_from_json(obj: dict[str, Any], source: str = "pieces") -> TokenPieces:
    """Inverse of `pieces_to_json`.

    Raises:
        KdcacheError: a malformed table (the message names `source`).
    """
    try:
        raw = obj["pieces"]
        if not isinstance(raw, list) or len(raw) > _MAX_PIECES:
            raise ValueError(f"'pieces' must be a list of at most {_MAX_PIECES} entries")
        pieces = tuple(None if p is None else bytes.fromhex(p) for p in raw)
        bos, eos = obj.get("bos_id"), obj.get("eos_id")
        return TokenPieces(
            pieces=pieces,
            bos_id=None if bos is None else int(bos),
            eos_id=None if eos is None else int(eos),
            fingerprint=str(obj["fingerprint"]),
            name=str(obj.get("name", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KdcacheError(f"{source}: not a token piece table ({exc})") from exc
