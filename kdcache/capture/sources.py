"""Input records: read a work unit's documents from jsonl / Parquet / text files, tokenize them, cut windows.

A work unit (see `plan.py`) names one file and a range inside it: a byte range for jsonl (the unit owns every line
that *starts* inside it, so adjacent units never share or lose a line), a row group for Parquet, the whole file for
text. Each document gets a stable locator (file, byte offset or row), and each window of `max_length` tokens a
deterministic 63-bit `seq_id` derived from (file, locator, window index). Chat and prompt/completion records
(`kdcache.capture.chat`) come from jsonl or Parquet files the same way (the unit's kind says which).

Malformed input raises `SourceError` naming the file and line (or byte offset) or row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.capture.chat import ChatRecord, parse_chat, parse_prompt, parse_prompt_completion
from kdcache.errors import SourceError
from kdcache.store import open_url

__all__ = [
    "Document",
    "Window",
    "iter_documents",
    "make_seq_id",
    "parquet_row_groups",
    "tokenize_documents",
    "cut_windows",
]


@dataclass(frozen=True)
class Document:
    """One input record: its locator inside the file and either text, token ids or a chat record."""

    locator: str  # "b<byte offset>" (jsonl), "r<row>" (parquet), "f" (text file)
    text: str | None = None
    ids: Sequence[int] | None = None
    where: str = ""  # "<url>: line N" / "<url>: row N" / "<url>": what an error about this record names
    chat: ChatRecord | None = None  # data.format chat / prompt_completion


@dataclass(frozen=True)
class Window:
    """One teacher sequence: at most max_length token ids of one document."""

    seq_id: int
    input_ids: np.ndarray  # [T] int32
    target_mask: np.ndarray | None = None  # [T] bool: the positions that get a target (None: every position)
    fields: dict[str, int] | None = None  # per-sequence values stored with it (generated: prompt_id, sample_index)
    token_text: bytes | None = None  # targets.cross_tokenizer: the bytes behind the window's tokens (None: unknown)
    token_text_ends: np.ndarray | None = None  # [T] int64: each token's byte end in token_text


def make_seq_id(source_url: str, locator: str, window_index: int) -> int:
    """Deterministic non-negative 63-bit id of a window (blake2b of its origin)."""
    h = hashlib.blake2b(f"{source_url}\0{locator}\0{window_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def iter_documents(
    unit: dict[str, Any],
    *,
    fmt: str,
    text_field: str,
    ids_field: str | None,
    storage_options: dict[str, Any] | None = None,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    prompts_only: bool = False,
) -> Iterator[Document]:
    """Yield the documents of one work unit (a dict from `plan.WorkUnit.to_dict()`).

    For ``fmt`` chat / prompt_completion the records come from jsonl or Parquet by the unit's kind (byte range or
    row group) and each document carries a `ChatRecord` (fields: ``messages_field`` / ``prompt_field`` and
    ``completion_field``). With ``prompts_only`` (generation) each carries the prompt to answer instead
    (`kdcache.capture.chat.parse_prompt`: no completion is read; an empty prompt is an error).
    """
    if fmt in ("chat", "prompt_completion") and prompts_only:
        field = messages_field if fmt == "chat" else prompt_field
        columns = {field: "data.messages_field" if fmt == "chat" else "data.prompt_field"}

        def parse(record: Any, where: str) -> Document | None:
            chat = parse_prompt(record, where, fmt=fmt, messages_field=messages_field, prompt_field=prompt_field)
            return Document("", chat=chat)

        if unit.get("kind") == "row_group":
            yield from _iter_parquet(unit["url"], unit["start"], columns, parse, storage_options)
        else:
            yield from _iter_jsonl(unit["url"], unit["start"], unit["stop"], parse, storage_options)
        return
    if fmt in ("chat", "prompt_completion"):
        if fmt == "chat":
            columns = {messages_field: "data.messages_field"}

            def parse(record: Any, where: str) -> Document | None:
                chat = parse_chat(record, where, messages_field=messages_field)
                return None if chat is None else Document("", chat=chat)

        else:
            columns = {prompt_field: "data.prompt_field", completion_field: "data.completion_field"}

            def parse(record: Any, where: str) -> Document | None:
                chat = parse_prompt_completion(
                    record, where, prompt_field=prompt_field, completion_field=completion_field
                )
                return None if chat is None else Document("", chat=chat)

        if unit.get("kind") == "row_group":
            yield from _iter_parquet(unit["url"], unit["start"], columns, parse, storage_options)
        else:
            yield from _iter_jsonl(unit["url"], unit["start"], unit["stop"], parse, storage_options)
        return

    def parse_text(record: Any, where: str) -> Document | None:
        return _record_value(record, where, text_field, ids_field)

    if fmt == "jsonl":
        yield from _iter_jsonl(unit["url"], unit["start"], unit["stop"], parse_text, storage_options)
    elif fmt == "parquet":
        key = "data.ids_field" if ids_field else "data.text_field"
        columns = {ids_field or text_field: key}
        yield from _iter_parquet(unit["url"], unit["start"], columns, parse_text, storage_options)
    elif fmt == "text":
        with open_url(unit["url"], "rb", storage_options) as f:
            raw = f.read()
        try:
            yield Document("f", text=raw.decode("utf-8"), where=unit["url"])
        except UnicodeDecodeError as exc:
            raise SourceError(f"{unit['url']}: not valid UTF-8 at byte {exc.start}") from None
    else:
        raise SourceError(f"data.format: unsupported format {fmt!r}")


def _record_value(record: Any, where: str, text_field: str, ids_field: str | None) -> Document | None:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if ids_field is not None:
        if ids_field not in record:
            raise SourceError(f"{where}: missing field {ids_field!r} (data.ids_field)")
        ids = record[ids_field]
        if ids is None:
            return None
        if not isinstance(ids, (list, tuple, np.ndarray)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise SourceError(f"{where}: field {ids_field!r} must be a list of non-negative integers")
        return Document("", ids=[int(i) for i in ids])
    if text_field not in record:
        raise SourceError(f"{where}: missing field {text_field!r} (data.text_field)")
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return Document("", text=text)


def _iter_jsonl(url, start, stop, parse, storage_options) -> Iterator[Document]:
    with open_url(url, "rb", storage_options) as f:
        offset = start
        if start > 0:
            # The line that straddles `start` belongs to the previous unit: skip to the next line start.
            f.seek(start - 1)
            previous = f.readline()
            offset = start - 1 + len(previous)
        else:
            f.seek(0)
        line_no = 1 if start == 0 else None  # line numbers are exact only for units that begin the file
        while offset < stop:
            line = f.readline()
            if not line:
                break
            where = f"{url}: line {line_no}" if line_no is not None else f"{url}: line at byte {offset}"
            this_offset = offset
            offset += len(line)
            if line_no is not None:
                line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{where}: malformed JSON ({exc})") from None
            doc = parse(record, where)
            if doc is None:
                yield Document(f"b{this_offset}", where=where)
            else:
                yield Document(f"b{this_offset}", doc.text, doc.ids, where, doc.chat)


def parquet_row_groups(url: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Row counts of each row group of a Parquet file (reads only the footer)."""
    import pyarrow.parquet as pq

    with open_url(url, "rb", storage_options) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for a bad footer
            raise SourceError(f"{url}: not a readable Parquet file ({exc})") from None
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _iter_parquet(url, row_group, columns, parse, storage_options) -> Iterator[Document]:
    """Documents of one row group: ``parse({column: value, ...}, where)`` per row; ``columns`` maps each column read
    to the config key that names it (for the error when it is missing)."""
    import pyarrow.parquet as pq

    with open_url(url, "rb", storage_options) as f:
        pf = pq.ParquetFile(f)
        for column in columns:
            if column not in pf.schema_arrow.names:
                raise SourceError(f"{url}: no column {column!r} ({columns[column]}); columns: {pf.schema_arrow.names}")
        first_row = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
        table = pf.read_row_group(row_group, columns=list(columns))
    values = {column: table.column(column).to_pylist() for column in columns}
    for i in range(table.num_rows):
        row = first_row + i
        doc = parse({column: values[column][i] for column in columns}, f"{url}: row {row}")
        if doc is None:
            yield Document(f"r{row}", where=f"{url}: row {row}")
        else:
            yield Document(f"r{row}", doc.text, doc.ids, f"{url}: row {row}", doc.chat)


def tokenize_documents(
    docs: Iterator[Document], encode: Callable[[list[str]], list[list[int]]], *, batch_size: int = 256
) -> Iterator[tuple[Document, list[int]]]:
    """Attach token ids to documents, tokenizing text in batches with `encode` (a fast tokenizer's batch call)."""
    pending: list[Document] = []

    def flush() -> Iterator[tuple[Document, list[int]]]:
        texts = [d.text for d in pending if d.text is not None]
        try:
            encoded = iter(encode(texts) if texts else [])
        except Exception:
            _raise_unencodable(pending)  # name the record that the tokenizer refused, if it is not valid Unicode
            raise
        for d in pending:
            yield d, (list(d.ids) if d.ids is not None else (next(encoded) if d.text is not None else []))
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _raise_unencodable(docs: list[Document]) -> None:
    """SourceError naming the first document whose text is not valid Unicode (JSON lets a lone surrogate through)."""
    for doc in docs:
        if doc.text is None:
            continue
        try:
            doc.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SourceError(
                f"{doc.where or doc.locator}: the text holds {doc.text[exc.start]!r} at character {exc.start}, a lone "
                "UTF-16 surrogate (not valid Unicode, so no tokenizer takes it); fix or drop this record"
            ) from None


def cut_windows(ids: Sequence[int], max_length: int, min_length: int) -> list[np.ndarray]:
    """Split one document's ids into consecutive non-overlapping windows; drop a last window under min_length."""
    arr = np.asarray(ids, dtype=np.int64)
    windows = [arr[i : i + max_length] for i in range(0, len(arr), max_length)]
    return [w.astype(np.int32) for w in windows if len(w) >= min_length]
