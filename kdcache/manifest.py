"""The cache's layout and its manifest, `index.json`: the one entry point for readers.

Layout under the cache root (all keys relative, see docs/FORMAT.md):

    fingerprint.json              written first, exclusively: the cache's identity (refuses a different job)
    shards/<unit_id>-<attempt>.parquet   one immutable data object per work unit attempt
    commits/<unit_id>.json        commit record, created exclusively after its shard is complete; first one wins
    index.json                    the manifest, written last by the driver from the commit records

Readers only read `index.json` and the shards it names; they never list the store.
"""

from __future__ import annotations

import json
from typing import Any

from kdcache.errors import CacheMismatchError, CorruptShardError
from kdcache.store import Store, safe_relpath

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_KEY",
    "FINGERPRINT_KEY",
    "commit_key",
    "read_manifest",
    "shard_key",
    "validate_manifest",
]

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
INDEX_KEY = "index.json"
FINGERPRINT_KEY = "fingerprint.json"
COMMITS_DIR = "commits"
SHARDS_DIR = "shards"
UNIT_KEYS = ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")


def shard_key(unit_id: str, attempt: str, suffix: str) -> str:
    """Where one attempt of a unit writes its data object (unique per attempt: attempts never overwrite)."""
    return f"{SHARDS_DIR}/{unit_id}-{attempt}{suffix}"


def commit_key(unit_id: str) -> str:
    return f"{COMMITS_DIR}/{unit_id}.json"


def dumps(value: Any) -> bytes:
    """JSON bytes as kdcache writes them (sorted keys, indented, trailing newline)."""
    return (json.dumps(value, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def validate_manifest(manifest: Any, where: str = INDEX_KEY) -> dict[str, Any]:
    """Check a manifest's version and shape; every shard path must stay inside the cache root."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptShardError(f"{where}: not a kdcache manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{where}: cache format version {version} is not supported by this kdcache (reads {FORMAT_VERSION})"
        )
    for key in ("fingerprint", "fingerprint_inputs", "units", "stats", "complete", "shard_format"):
        if key not in manifest:
            raise CorruptShardError(f"{where}: manifest lacks {key!r}")
    for unit in manifest["units"]:
        missing = [k for k in UNIT_KEYS if k not in unit]
        if missing:
            raise CorruptShardError(f"{where}: unit {unit.get('unit_id')!r} lacks {missing}")
        try:
            safe_relpath(unit["path"])
        except ValueError as exc:
            raise CorruptShardError(f"{where}: unit {unit['unit_id']}: {exc}") from None
    return manifest


def read_manifest(store: Store) -> dict[str, Any] | None:
    """The validated manifest, or None if the cache has none yet."""
    try:
        raw = store.read_bytes(INDEX_KEY)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptShardError(f"{store.url(INDEX_KEY)}: invalid JSON ({exc})") from None
    return validate_manifest(manifest, store.url(INDEX_KEY))
