"""Storage access through fsspec (local paths, s3://, gs://, memory://): the only module that imports fsspec.

A `Store` is a cache root plus relative keys. It offers what the commit protocol needs and nothing more:
whole-object reads and writes, exclusive creation of small records (first writer wins), deletion, and listings
used by the driver to find commit records and orphaned shards. Every relative key is checked to stay inside the
root. Transient errors (network, throttling, 5xx) are retried `retries` times (default 4, `output.store_retries`)
with exponential backoff (0.2, 0.4, 0.8, 1.6 s), then raised as `StoreError` naming the key; `Store.retries_used`
counts the retries for the job's statistics. That budget is the whole budget: on s3:// the libraries' own retries
(s3fs retries a call 5 times, botocore each request up to 5 times: 125 HTTP attempts per write) are turned off unless
the storage options set them, so a persistent outage fails a write after `retries` + 1 HTTP attempts. Errors that
retrying cannot fix (access denied, a missing bucket, a file where the cache folder should be) raise `StoreError`
naming the URI and what to check, never a library traceback.

Fork- and spawn-safe: the fsspec filesystem is opened lazily in each process (an s3fs client opened in a parent
refuses to work in a forked child, e.g. a DataLoader worker) and never pickled.

Exclusive creation on object stores is a conditional PUT (`If-None-Match: *`). Not every S3-compatible server
honours that header, so a Store probes it once per process and bucket (a PUT of a scratch key, then a second PUT
that must be refused) and, where it is ignored, falls back to check-write-read-back, which is not atomic: two
racing writers may both believe they won. Even then nothing a reader sees is wrong: a winner never deletes its
shard, the driver names one of the identical shards in the manifest and deletes the other as an orphan.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from kdcache.errors import StoreError

__all__ = ["Store", "expand_urls", "is_transient", "join_url", "open_url", "safe_relpath"]

T = TypeVar("T")
log = logging.getLogger("kdcache.store")
_MEMORY_LOCK = threading.Lock()
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Exceptions from these libraries are network or service trouble (connection resets, timeouts, 5xx) unless they
# are one of the _NOT_TRANSIENT types; s3fs and gcsfs let some of them through untranslated.
_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "gcsfs", "s3fs", "http")
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs")
_CONDITIONAL_PUT: dict[tuple[str, str], bool] = {}  # (protocol + endpoint, bucket) -> whether If-None-Match works
_CONDITIONAL_PUT_LOCK = threading.Lock()
DEFAULT_RETRIES = 4  # attempts after the first for transient errors (docs/SCALING.md, output.store_retries)
DEFAULT_BASE_DELAY_S = 0.2  # first backoff delay in seconds; doubles after each retry
_S3_PROTOCOLS = ("s3", "s3a")


def _reset_locks_after_fork() -> None:
    """A lock held by another thread at fork time would stay locked forever in the child."""
    global _MEMORY_LOCK, _CONDITIONAL_PUT_LOCK
    _MEMORY_LOCK, _CONDITIONAL_PUT_LOCK = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


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


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying: I/O, timeouts and network-library errors, not missing/existing keys."""
    if isinstance(exc, _NOT_TRANSIENT) or isinstance(exc, StoreError):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return any(type(c).__module__.split(".")[0] in _NETWORK_MODULES for c in _causes(exc))


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _with_retries(
    what: str, fn: Callable[[], T], retries: int, base_delay_s: float, on_retry: Callable[[], None] | None = None
) -> T:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise StoreError(f"{what}: failed after {retries + 1} attempts: {type(exc).__name__}: {exc}") from exc
            if on_retry is not None:
                on_retry()
            time.sleep(base_delay_s * 2**attempt)  # 0.2, 0.4, 0.8, 1.6 s by default: rides out throttling
    raise AssertionError("unreachable")


class Store:
    """A cache root on any fsspec filesystem.

    Args:
        uri: the root URL (``/data/cache``, ``s3://bucket/cache``, ``memory://cache``).
        storage_options: passed to fsspec (credentials belong in the environment or a profile, never in a manifest).
        retries: attempts after the first for transient errors (the libraries' own retries are off unless
            `storage_options` turn them on); base_delay_s: first backoff delay in seconds.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = DEFAULT_RETRIES,
        base_delay_s: float = DEFAULT_BASE_DELAY_S,
    ):
        if retries < 0 or base_delay_s < 0:
            raise ValueError(f"retries and base_delay_s must be >= 0, got {retries} and {base_delay_s}")
        self.uri = uri.rstrip("/") or uri
        self.storage_options = dict(storage_options or {})
        fs, root = self._open()
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._fs, self._fs_pid = fs, os.getpid()
        self.retries = retries
        self.base_delay_s = base_delay_s
        self.retries_used = 0  # transient errors retried so far (reported in the job's statistics)

    def _open(self) -> tuple[Any, str]:
        """This process's filesystem and the root path in it."""
        options = _without_library_retries(self.uri, self.storage_options)
        fs, root = url_to_fs(self.uri, **options)
        if options is not self.storage_options:
            fs.retries = 1  # s3fs's own loop: one attempt per call (this instance only: its options are ours)
        return fs, root

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, opened in this process (reopened after a fork: clients do not survive one)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._fs_pid = self._open()[0], os.getpid()
        return self._fs

    @fs.setter
    def fs(self, value: Any) -> None:  # tests and fault injection wrap the filesystem
        self._fs, self._fs_pid = value, os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # a client is not sent to another process: it opens its own

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def path(self, relpath: str) -> str:
        """The filesystem path of a relative key (checked to stay inside the root)."""
        return posixpath.join(self.root, safe_relpath(relpath)) if self.root else safe_relpath(relpath)

    def url(self, relpath: str) -> str:
        return join_url(self.uri, relpath)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return _with_retries(what, fn, self.retries, self.base_delay_s, self._count_retry)
        except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError, FileNotFoundError) as exc:
            problem = self._explain(exc)
            if problem is None:
                raise  # a missing key: the caller's business
            raise StoreError(f"{what}: {problem}") from exc

    def _explain(self, exc: OSError) -> str | None:
        """What to tell the user about an error that retrying cannot fix (None: a plain missing key)."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FileNotFoundError):
            if self.protocol in _OBJECT_STORES and "bucket" in str(exc).lower():
                bucket = self.root.split("/", 1)[0]
                return f"the bucket {bucket!r} does not exist ({reason}); create it, or correct the URI {self.uri}"
            return None
        if isinstance(exc, PermissionError):
            if self.is_local:
                return f"permission denied ({reason}); choose a location this user may use, or fix its permissions"
            return (
                f"access denied ({reason}); check the credentials this process has for {self.uri} (environment "
                "variables, profile or instance role; output.storage_options) and the bucket's policy"
            )
        if self.is_local and os.path.isfile(self.root):
            return f"{self.root} is a file, and a kdcache cache is a folder: choose a folder path for it"
        if isinstance(exc, FileExistsError) and not self.is_local:
            return None
        if isinstance(exc, IsADirectoryError):
            return f"a folder is where a file should be ({reason}); move it, or choose another path for the cache"
        return f"a file is in the way ({reason}); a cache is a folder of folders: move the file or choose another path"

    def _count_retry(self) -> None:
        self.retries_used += 1

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
        S3 / GCS: a conditional PUT (If-None-Match: * / ifGenerationMatch=0); an S3-compatible server that ignores
        the header is detected once and handled by check-write-read-back (not atomic, see the module docstring).
        memory://: a process-wide lock. Others: check-then-write, not atomic; the job warns about it at start.

        Idempotent under retries: if the object exists with exactly `data`, this counts as created. A PUT whose
        response was lost (timeout, reset) may have landed; its retry must not be taken for a lost race, or the
        worker would delete the shard its own commit record names. Commit records name a shard key unique to
        their attempt, so equal bytes can only be this attempt's own record.
        """
        path = self.path(relpath)
        what = f"create {self.url(relpath)}"
        if self.is_local:
            created = self._retry(what, lambda: _local_exclusive_write(path, data))
        elif self.protocol == "memory":
            with _MEMORY_LOCK:
                created = not self.fs.exists(path)
                if created:
                    self.fs.pipe_file(path, data)
        elif self.protocol in _OBJECT_STORES and self.conditional_put_works():
            created = self._retry(what, lambda: _conditional_put(self.fs, path, data))
        else:
            created = self._retry(what, lambda: _check_write_verify(self.fs, path, data))
        return created or self._holds(relpath, data)

    def _holds(self, relpath: str, data: bytes) -> bool:
        try:
            return self.read_bytes(relpath) == data
        except FileNotFoundError:  # deleted in between: someone else's business, not a win
            return False

    def conditional_put_works(self) -> bool:
        """Whether this object store refuses a conditional PUT onto an existing key (probed once per process)."""
        if self.protocol not in _OBJECT_STORES:
            return False
        if self.protocol in ("gs", "gcs"):  # GCS has always honoured generation preconditions
            return True
        client_kwargs = self.storage_options.get("client_kwargs") or {}
        endpoint = str(self.storage_options.get("endpoint_url") or client_kwargs.get("endpoint_url") or "aws")
        key = (f"{self.protocol}:{endpoint}", self.root.split("/", 1)[0])
        with _CONDITIONAL_PUT_LOCK:
            if key not in _CONDITIONAL_PUT:
                what = f"probe conditional PUT at {self.uri}"
                _CONDITIONAL_PUT[key] = self._retry(what, self._probe_conditional_put)
                if not _CONDITIONAL_PUT[key]:
                    log.warning(
                        "%s: the server ignores If-None-Match; commits fall back to check-write-read-back, which is "
                        "not atomic (duplicates are possible, never lost or torn shards)",
                        self.uri,
                    )
            return _CONDITIONAL_PUT[key]

    def _probe_conditional_put(self) -> bool:
        path = self.path(f"_kdcache_probe/{uuid.uuid4().hex}")
        try:
            _conditional_put(self.fs, path, b"1")
            return not _conditional_put(self.fs, path, b"2")
        except OSError as exc:
            if "NotImplemented" in str(exc) or "501" in str(exc):
                return False
            raise
        finally:
            try:
                self.fs.rm_file(path)
            except OSError:
                pass

    @property
    def exclusive_create_is_atomic(self) -> bool:
        if self.is_local or self.protocol == "memory":
            return True
        return self.protocol in _OBJECT_STORES and self.conditional_put_works()

    def delete(self, relpath: str, *, missing_ok: bool = True) -> None:
        path = self.path(relpath)
        try:
            self._retry(f"delete {self.url(relpath)}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def read_many(self, relpaths: list[str]) -> dict[str, bytes]:
        """Several whole objects by relative key (concurrent requests on object stores); a missing one raises."""
        if not relpaths:
            return {}
        by_path = {self.fs._strip_protocol(self.path(r)): r for r in relpaths}
        what = f"read {len(relpaths)} objects under {self.uri}"
        found = self._retry(what, lambda: self.fs.cat(list(by_path), on_error="raise"))
        if not isinstance(found, dict):  # some filesystems answer a one-element list with the bytes
            found = {next(iter(by_path)): found}
        return {by_path[self.fs._strip_protocol(p)]: data for p, data in found.items()}

    def list_names(self, reldir: str) -> list[str]:
        """Names of the objects directly under `reldir` (empty if it does not exist). Used by the driver only."""
        path = self.path(reldir)
        try:
            entries = self._retry(f"list {self.url(reldir)}", lambda: self.fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def _without_library_retries(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Storage options with the client library's own retries off: `Store` retries (s3:// only; options that set
    `config_kwargs: {retries: ...}` keep botocore's and s3fs's retries as they are, and are returned unchanged).

    botocore retries each request up to 5 times by itself and s3fs each call 5 times; nested in the store's own
    loop that made a persistent outage cost 125 HTTP attempts and minutes per write."""
    config = dict(storage_options.get("config_kwargs") or {})
    if fsspec.utils.get_protocol(uri) not in _S3_PROTOCOLS or "retries" in config:
        return storage_options
    config["retries"] = {"total_max_attempts": 1}
    return {**storage_options, "config_kwargs": config}


def _conditional_put(fs: Any, path: str, data: bytes) -> bool:
    """PUT `data` only if `path` does not exist; False if it does (412 Precondition Failed)."""
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if _is_precondition_failure(exc):
            return False
        raise


def _check_write_verify(fs: Any, path: str, data: bytes) -> bool:
    """Exclusive create without server support: not atomic, but the read-back catches most races."""
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return fs.cat_file(path) == data


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
            # local: absolute and normalised ("../data/a.jsonl" from any directory is one URL: the file's identity)
            url = os.path.abspath(p) if protocol in ("file", "local") else fs.unstrip_protocol(p)
            out[url] = int(fs.size(p))
    return sorted(out.items())


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    """Open one file by URL (used for reading input sources)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    return fs.open(path, mode)
