"""The text behind every teacher token of a window, for students with another tokenizer (`targets.cross_tokenizer`).

    ends = document_token_ends(pieces, ids, text, offsets_of)     # byte end of each of a document's tokens
    text, window_ends = window_text(text.encode(), ends, start, stop)   # one window's bytes and its tokens' ends

A token's text is the bytes from its start to the next token's start, so a window's tokens cover its text exactly
once; tokens without text (BOS, EOS, template tokens) cover none. Exact from the tokenizer's pieces where they spell
the document (byte-level BPE always does, even for tokens that split a character); otherwise from the tokenizer's
character offsets (`kdcache.pieces.token_spans`). Pure functions; the worker calls them per document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.pieces import TokenPieces, token_spans

__all__ = ["document_token_ends", "window_text"]

OffsetsOf = Callable[[str], tuple[list[int], list[tuple[int, int]]]]  # text -> (ids, character offsets)


def document_token_ends(pieces: TokenPieces, ids: Sequence[int], text: str, offsets_of: OffsetsOf) -> np.ndarray:
    """Byte end of each token of a document ([n] int64, non-decreasing, the last text token's is the text's length).

    Args:
        pieces: the tokenizer's pieces.
        ids: the document's ids as the worker has them (the tokenizer's, plus an EOS it may have appended).
        text: the document.
        offsets_of: tokenizes `text` again with character offsets (asked only when the pieces do not spell it).

    Raises:
        KdcacheError: the tokenizer gives other ids for the text than `ids` (beyond appended tokens without text).
    """
    data = text.encode("utf-8")
    try:
        return token_spans(pieces, ids, data)
    except KdcacheError:
        pass
    again, offsets = offsets_of(text)
    extra = len(ids) - len(again)
    if extra < 0 or list(ids[: len(again)]) != list(again) or any(pieces.piece(int(i)) for i in ids[len(again) :]):
        raise KdcacheError(
            "targets.cross_tokenizer: the tokenizer gives other ids for a document when asked for offsets; "
            "the text behind its tokens cannot be recorded"
        )
    return token_spans(pieces, ids, data, [*offsets, *[(len(text), len(text))] * extra])


def window_text(data: bytes, ends: np.ndarray, start: int, stop: int) -> tuple[bytes, np.ndarray]:
    """The bytes behind tokens [start, stop) of a document and their ends relative to the window ([stop - start]
    int64; the last is the length of the bytes)."""
    first = int(ends[start - 1]) if start > 0 else 0
    window_ends = np.asarray(ends[start:stop], dtype=np.int64) - first
    last = first + (int(window_ends[-1]) if len(window_ends) else 0)
    return data[first:last], window_ends
