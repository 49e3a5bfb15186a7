"""Storage access through fsspec (local paths, s3://, gs://, memory://): the only module that imports fsspec.

A `Store` is a cache root plus relative keys. It offers what the commit protocol needs and nothing more:
whole-object reads and writes, exclusive creation of small records (first writer wins), deletion, and one
listing used by the driver to find commit records. Every relative key is checked to stay inside the root.
Transient errors are retried with exponential backoff, then raised naming the key.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from kdcache.errors import KdcacheError

__all__ = ["Store", "StoreError", "expand_urls", "join_url", "open_url", "safe_relpath"]

T = TypeVar("T")
_MEMORY_LOCK = threading.Lock()
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class StoreError(KdcacheError):
    """A storage operation failed after its retries; the message names the key."""


def safe_relpath(relpath: str) -> str:
    """Normalize a relative key and refuse anything that would leave the cache root."""
    if not isinstance(relpath, str) or not relpath:
        raise ValueError(f"invalid cache key {relpath!r}")
    if "://" in relpath or relpath.startswith(("/", "\\")) or (len(relpath) > 1 and relpath[1] == ":"):
        raise ValueError(f"cache key {relpath!r} must be relative to the cache root")
    norm = posixpath.normpath(relpath.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"cache key {relpath!r} points outside the cache root")
    return norm


def join_url(uri: str, relpath: str) -> str:
    """The URL of `relpath` under `uri` (for messages)."""
    return uri.rstrip("/") + "/" + safe_relpath(relpath)


def _with_retries(what: str, fn: Callable[[], T], retries: int, base_delay_s: float) -> T:
    for attempt in range(retries + 1):
        try:
            return fn()
        except _NOT_TRANSIENT:
            raise
        except OSError as exc:  # network or server trouble: back off and try again
            if attempt == retries:
                raise StoreError(f"{what}: failed after {retries + 1} attempts: {exc}") from exc
            time.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")


class Store:
    """A cache root on any fsspec filesystem.

    Args:
        uri: the root URL (``/data/cache``, ``s3://bucket/cache``, ``memory://cache``).
        storage_options: passed to fsspec (credentials belong in the environment or a profile, never in a manifest).
        retries: attempts after the first for transient errors; base_delay_s: first backoff delay in seconds.
    """

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, *, retries: int = 4, base_delay_s: float = 0.2
    ):
        self.uri = uri.rstrip("/") or uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(self.uri, **self.storage_options)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.retries = retries
        self.base_delay_s = base_delay_s

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def path(self, relpath: str) -> str:
        """The filesystem path of a relative key (checked to stay inside the root)."""
        return posixpath.join(self.root, safe_relpath(relpath)) if self.root else safe_relpath(relpath)

    def url(self, relpath: str) -> str:
        return join_url(self.uri, relpath)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return _with_retries(what, fn, self.retries, self.base_delay_s)

    def exists(self, relpath: str) -> bool:
        return self._retry(f"exists {self.url(relpath)}", lambda: self.fs.exists(self.path(relpath)))

    def size(self, relpath: str) -> int:
        return int(self._retry(f"size {self.url(relpath)}", lambda: self.fs.size(self.path(relpath))))

    def read_bytes(self, relpath: str) -> bytes:
        """The whole object; FileNotFoundError if it does not exist."""
        return self._retry(f"read {self.url(relpath)}", lambda: self.fs.cat_file(self.path(relpath)))

    def open(self, relpath: str, mode: str = "rb", **kwargs: Any):
        """A file object for range reads (e.g. handed to pyarrow)."""
        return self.fs.open(self.path(relpath), mode, **kwargs)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write a whole object so that readers see either the old or the new one, never a part."""
        path = self.path(relpath)
        if self.is_local:
            self._retry(f"write {self.url(relpath)}", lambda: _local_atomic_write(path, data))
        else:
            self._retry(f"write {self.url(relpath)}", lambda: self.fs.pipe_file(path, data))

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        """Create a small object only if it does not exist yet. Returns True if this call created it.

        Local disk: write a temporary file, then hard-link it into place (the link fails if the name exists).
        S3: a conditional PUT (If-None-Match: *). memory://: a process-wide lock. Others: check-then-write,
        which is not atomic; the job warns about it at start.
        """
        path = self.path(relpath)
        what = f"create {self.url(relpath)}"
        if self.is_local:
            return self._retry(what, lambda: _local_exclusive_write(path, data))
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        if self.protocol in ("s3", "s3a", "gs", "gcs"):

            def put() -> bool:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                    return True
                except FileExistsError:
                    return False
                except OSError as exc:
                    if _is_precondition_failure(exc):
                        return False
                    raise

            return self._retry(what, put)
        if self.exists(relpath):
            return False
        self.write_bytes(relpath, data)
        return True

    @property
    def exclusive_create_is_atomic(self) -> bool:
        return self.is_local or self.protocol in ("memory", "s3", "s3a", "gs", "gcs")

    def delete(self, relpath: str, *, missing_ok: bool = True) -> None:
        path = self.path(relpath)
        try:
            self._retry(f"delete {self.url(relpath)}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def list_names(self, reldir: str) -> list[str]:
        """Names of the objects directly under `reldir` (empty if it does not exist). Used by the driver only."""
        path = self.path(reldir)
        try:
            entries = self._retry(f"list {self.url(reldir)}", lambda: self.fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def _is_precondition_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("PreconditionFailed", "412", "ConditionalRequestConflict", "conditionNotMet"))


def _local_atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _local_exclusive_write(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def expand_urls(urls: str | list[str], storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """Expand URLs and globs into a sorted list of (url, size in bytes) of files; a pattern matching nothing raises."""
    out: dict[str, int] = {}
    for pattern in [urls] if isinstance(urls, str) else list(urls):
        fs, _ = url_to_fs(pattern, **(storage_options or {}))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        paths = fs.glob(url_to_fs(pattern, **(storage_options or {}))[1]) if fsspec.core.has_magic(pattern) else None
        if paths is None:
            path = url_to_fs(pattern, **(storage_options or {}))[1]
            paths = fs.find(path) if fs.isdir(path) else ([path] if fs.exists(path) else [])
        files = [p for p in paths if fs.isfile(p)]
        if not files:
            raise FileNotFoundError(f"data.source: {pattern!r} matches no files")
        for p in files:
            url = p if protocol in ("file", "local") else fs.unstrip_protocol(p)
            out[url] = int(fs.size(p))
    return sorted(out.items())


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    """Open one file by URL (used for reading input sources)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    return fs.open(path, mode)
