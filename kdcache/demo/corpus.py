"""The demo corpus: the Python standard library's own sources as jsonl shards, split into train / valid by name.

`kdcache.demo.assets.prepare_demo` calls these; they need nothing but the standard library::

    docs = stdlib_documents(400)                       # [(name, text)], e.g. ("json/decoder.py", "...")
    train, valid = split_train_valid(docs)             # by a hash of the name: stable and disjoint
    write_corpus(train, workdir / "train", files=8)    # part-00000.jsonl ..., one {"text", "name"} per file
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "split_train_valid", "stdlib_documents", "write_corpus"]

MAX_FILE_BYTES = 100_000  # stdlib files larger than this are skipped (a handful of generated/huge modules)
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_documents(max_files: int | None = None, *, max_file_bytes: int = MAX_FILE_BYTES) -> list[tuple[str, str]]:
    """Read the Python standard library's own ``.py`` sources.

    Skips ``site-packages``, test directories, files over ``max_file_bytes``, blank files and files that are not
    valid UTF-8. With ``max_files`` set, keeps that many files spread evenly over the sorted list (so a small
    corpus still covers many packages rather than only ``_*.py`` modules).

    Args:
        max_files: Keep at most this many files; ``None`` keeps all (~700 files, ~9 MB).
        max_file_bytes: Skip files larger than this many bytes.

    Returns:
        ``(relative_name, text)`` pairs sorted by name; names use ``/`` separators, e.g. ``"json/decoder.py"``.
    """
    root = Path(os.path.dirname(os.__file__))
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in filenames:
            path = Path(dirpath) / filename
            if filename.endswith(".py") and path.is_file() and path.stat().st_size <= max_file_bytes:
                names.append(path.relative_to(root).as_posix())
    names.sort()
    docs: list[tuple[str, str]] = []
    for name in names:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((name, text))
    if max_files is not None and len(docs) > max_files:
        if max_files <= 0:
            return []
        step = len(docs) / max_files  # evenly spaced picks; indices strictly increase, so output stays sorted
        docs = [docs[int(i * step)] for i in range(max_files)]
    return docs


def _name_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from a name (sha256; unlike ``hash`` it is not salted)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_train_valid(
    docs: Sequence[tuple[str, str]], valid_fraction: float = 0.1
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split documents into train / valid by a hash of their name, deterministically and disjointly.

    A document goes to valid when its name hashes below ``valid_fraction``, so its side never depends on which other
    files are present. With ``valid_fraction > 0`` and at least 2 documents, both sides are kept non-empty (the
    lowest- or highest-hashing name moves over).

    Args:
        docs: ``(name, text)`` pairs; names must be unique.
        valid_fraction: Expected share of documents held out, in ``[0, 1)``.

    Returns:
        ``(train, valid)``, each in the input order.

    Raises:
        ValueError: ``valid_fraction`` outside ``[0, 1)`` or duplicate names.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    names = [name for name, _ in docs]
    if len(set(names)) != len(names):
        raise ValueError("split_train_valid: document names must be unique (they decide the split)")
    keys = {name: _name_fraction(name) for name in names}
    valid_names = {name for name in names if keys[name] < valid_fraction}
    if valid_fraction > 0 and len(names) >= 2:
        if not valid_names:
            valid_names = {min(names, key=keys.__getitem__)}
        elif len(valid_names) == len(names):
            valid_names.discard(max(names, key=keys.__getitem__))
    train = [doc for doc in docs if doc[0] not in valid_names]
    valid = [doc for doc in docs if doc[0] in valid_names]
    return train, valid


def write_corpus(docs: Sequence[tuple[str, str]], out_dir: Path, *, files: int) -> list[Path]:
    """Write documents as jsonl shards ``part-00000.jsonl`` ..., one record ``{"text", "name"}`` per document.

    Documents are cut into ``min(files, len(docs))`` contiguous, near-equal runs, keeping their order.

    Args:
        docs: ``(name, text)`` pairs.
        out_dir: Created if missing.
        files: Number of shards wanted (fewer when there are fewer documents).

    Returns:
        The shard paths, in order.

    Raises:
        ValueError: ``files < 1`` or no documents.
    """
    if files < 1:
        raise ValueError(f"write_corpus: files must be >= 1, got {files}")
    if not docs:
        raise ValueError(f"write_corpus: no documents to write to {out_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = min(files, len(docs))
    paths = []
    for i in range(n_files):
        lo, hi = i * len(docs) // n_files, (i + 1) * len(docs) // n_files
        path = out_dir / f"part-{i:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for name, text in docs[lo:hi]:
                f.write(json.dumps({"text": text, "name": name}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
