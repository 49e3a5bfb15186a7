"""A size-limited local disk cache of shard bytes fetched from an object store, shared by the processes of a node.

    local = LocalShardCache("/local_nvme/kdcache", max_bytes=200 * 2**30)
    data = local.get(unit)                               # verified bytes, or None (absent or corrupt: re-fetch)
    if data is None:
        data = fetch_and_verify(unit)                      # the caller checks size and checksum of what it fetched
        local.put(unit["sha256"], data)

`CacheReader` (and so `KDCacheDataset`) uses it when given `local_cache_dir`; local caches are read in place and
never copied. Files are content-addressed: a shard is stored under its sha256 (from the manifest), so a name always
means the same bytes, whichever cache or job it came from, and nothing can be stale.

Safe for every DataLoader worker and rank of a node at once, without a lock server:

- a file is written to a unique temporary name in the directory, then renamed into place (atomic on POSIX), so a
  reader sees a complete file or none; two processes fetching the same shard both write it, the last rename wins,
  with the same bytes;
- a hit is checked against the manifest's size and sha256 before it is served; a truncated or corrupted copy is
  deleted and reported as a miss, so the caller fetches the shard again;
- eviction (least recently used first: a hit touches the file's mtime) runs under an exclusive `flock` of
  `.lock`, after every `put`, until the files total at most `max_bytes`; a file deleted while another process reads
  it stays readable through the open handle (POSIX), and one deleted before it is opened is a miss;
- a shard larger than `max_bytes` is not kept; temporary files older than an hour (a killed writer) are removed;
- a local cache never stops training: a directory that cannot be created, a full or read-only disk, a lock that
  cannot be taken, a file that cannot be deleted or touched are logged (once per kind of failure) and the shard is
  served from memory; a directory that cannot be created disables the cache.

Local disk only (`os`; fsspec stays in `kdcache.store`). No I/O happens at construction beyond creating the directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid

from kdcache.formats.memory import read_pooled
from kdcache.manifest import shard_checksum_error

__all__ = ["LocalShardCache"]

log = logging.getLogger("kdcache.read.localcache")
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died


class LocalShardCache:
    """Shard bytes on local disk under `directory`, at most `max_bytes` in all, evicted least recently used.

    Args:
        directory: a local directory (created if missing); share it between the processes of one node.
        max_bytes: size limit of the cached files in bytes (> 0).

    Attributes:
        hits, misses, corrupt, evicted: counts of this object (this process), for tests and logs.
        disabled: True when the directory could not be created (every `get` misses, every `put` is dropped).
    """

    def __init__(self, directory: str, max_bytes: int):
        if int(max_bytes) <= 0:
            raise ValueError(f"local_cache_bytes must be > 0 bytes, got {max_bytes}")
        self.directory = os.path.abspath(os.path.expanduser(str(directory)))
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.corrupt = self.evicted = 0
        self.disabled = False
        self._warned: set[str] = set()
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:  # read-only or full disk, no permission: train without the local cache
            self.disabled = True
            self._warn("create", "%s: cannot create the local shard cache (%s); reading without it", exc)

    def _warn(self, kind: str, message: str, exc: BaseException) -> None:
        """Log a failure of the local disk once per kind (a read-only disk would otherwise log every shard)."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, self.directory, exc)

    def path(self, sha256: str) -> str:
        """The file of the shard with this sha256 (hex)."""
        if not _is_digest(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return os.path.join(self.directory, sha256)

    def get(self, unit: dict) -> memoryview | None:
        """The bytes of a manifest unit's shard if a valid local copy exists (size and checksum checked as readers
        check them, `kdcache.manifest.shard_checksum_error`), else None.

        A copy of the wrong size or checksum is deleted (and counted in `corrupt`), so the caller's re-fetch
        replaces it.
        """
        path, size = self.path(unit["sha256"]), int(unit["bytes"])
        if self.disabled:
            self.misses += 1
            return None
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:  # checked before a buffer of the recorded size exists
                    data = memoryview(b"")
                else:
                    data = read_pooled(f, size)
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:  # unreadable: fetch from the store instead
            self._warn("read", "%s: cannot read the local shard cache (%s); fetching shards instead", exc)
            self.misses += 1
            return None
        if shard_checksum_error(unit, data):
            self.corrupt += 1
            self.misses += 1
            log.warning(
                "%s: local copy has %d bytes (expected %d) or a wrong checksum; fetching it again",
                path,
                len(data),
                size,
            )
            self._unlink(path)
            return None
        self.hits += 1
        try:
            os.utime(path)  # least recently used is judged by mtime
        except FileNotFoundError:  # evicted by another process meanwhile: the bytes read are still good
            pass
        except OSError as exc:  # read-only disk: eviction order gets coarser, nothing else
            self._warn("touch", "%s: cannot touch local shard copies (%s)", exc)
        return data

    def size_of(self, unit: dict) -> int | None:
        """The size of the local copy of a unit's shard when it is there (None: absent or unreadable)."""
        if self.disabled:
            return None
        try:
            return os.stat(self.path(unit["sha256"])).st_size
        except OSError:
            return None

    def put(self, sha256: str, data: bytes | memoryview) -> None:
        """Keep `data` (already verified by the caller) as the shard with this sha256, then evict down to the limit."""
        if len(data) > self.max_bytes or self.disabled:
            return
        path = self.path(sha256)
        tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk must not stop training: the bytes are in memory
            self._warn("write", "%s: cannot keep local shard copies (%s)", exc)
            self._unlink(tmp)
            return
        self.evict(keep=sha256)

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used files until the rest total at most `max_bytes` (`keep` goes last).
        Failures of the disk are logged, never raised."""
        try:
            with open(os.path.join(self.directory, _LOCK_NAME), "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    self._evict_locked(keep)
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            self._warn("evict", "%s: cannot evict local shard copies (%s)", exc)

    def _evict_locked(self, keep: str | None) -> None:
        files, total = self._files()
        for _mtime, size, name in sorted(files):
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            if self._unlink(os.path.join(self.directory, name)):
                self.evicted += 1
            total -= size
        if total > self.max_bytes and keep is not None:
            self._unlink(os.path.join(self.directory, keep))

    def _unlink(self, path: str) -> bool:
        """Delete a file: True if it was deleted; False if it was gone or could not be (logged, never raised)."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:  # read-only disk (EROFS), no permission
            self._warn("delete", "%s: cannot delete local shard files (%s)", exc)
            return False

    def total_bytes(self) -> int:
        """Bytes of the cached files now (temporary files excluded)."""
        return self._files()[1]

    def _files(self) -> tuple[list[tuple[float, int, str]], int]:
        """[(mtime, size, name)] of the cached files and their total size; removes stale temporary files."""
        files, total, now = [], 0, time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_S:
                        self._unlink(entry.path)
                    continue
                if not _is_digest(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue  # only shard copies count and are evicted, never a file someone else put here
                files.append((st.st_mtime, st.st_size, entry.name))
                total += st.st_size
        return files, total


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)
