"""The cache's layout and its manifest, `index.json`: the one entry point for readers.

Layout under the cache root (all keys relative, see docs/FORMAT.md):

    fingerprint.json              written first, exclusively: the cache's identity (refuses a different job)
    shards/<unit_id>-<attempt>.parquet   one immutable data object per work unit attempt
    commits/<unit_id>.json        commit record, created exclusively after its shard is complete; first one wins
    index.json                    the manifest, written last by the driver from the commit records

Readers only read `index.json` and the shards it names; they never list the store.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from typing import Any

from kdcache.errors import CacheMismatchError, CorruptShardError
from kdcache.store import Store, safe_relpath
from kdcache.telemetry import describe, merge_summaries

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_KEY",
    "FINGERPRINT_KEY",
    "build_manifest",
    "commit_key",
    "read_manifest",
    "shard_checksum_error",
    "shard_key",
    "validate_manifest",
]

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 2
INDEX_KEY = "index.json"
FINGERPRINT_KEY = "fingerprint.json"
COMMITS_DIR = "commits"
SHARDS_DIR = "shards"
UNIT_KEYS = ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens")


def shard_checksum_error(unit: dict[str, Any], data: bytes | memoryview) -> str | None:
    """What is wrong with a shard's bytes against its manifest entry (size, then checksum), or None when they match.

    The checksum is the entry's `crc32` when it records one (zlib's CRC-32, ~7 GB/s: cheap enough for every read),
    else its `sha256` (~2 GB/s); `kdcache verify` checks the sha256 as well.
    """
    if len(data) != unit["bytes"]:
        got = f"more than {unit['bytes']}" if len(data) > unit["bytes"] else len(data)
        return f"shard has {got} bytes, the manifest records {unit['bytes']}"
    if "crc32" in unit:
        if zlib.crc32(data) != unit["crc32"]:
            return "shard fails its crc32 checksum (corrupted)"
    elif hashlib.sha256(data).hexdigest() != unit["sha256"]:
        return "shard fails its sha256 checksum (corrupted)"
    return None


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


def build_manifest(
    *,
    fingerprint: str,
    fingerprint_inputs: dict[str, Any],
    units: list[dict[str, Any]],
    shard_format: str,
    shard_suffix: str,
    config: dict[str, Any] | None = None,
    last_run: dict[str, Any] | None = None,
    created_at: float | None = None,
) -> dict[str, Any]:
    """Assemble a complete manifest from per-unit entries (each with at least UNIT_KEYS) in plan order.

    Per-unit `telemetry` histograms are merged into `stats.telemetry` and left out of the unit entries (they stay in
    the commit records): ~2 KB per unit that every reader would otherwise download.
    """
    from kdcache import __version__

    num_tokens = sum(u["num_tokens"] for u in units)
    total_bytes = sum(u["bytes"] for u in units)
    padded = sum(u.get("padded_tokens", u["num_tokens"]) for u in units)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"kdcache {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_at or time.time())),
        "complete": True,
        "fingerprint": fingerprint,
        "fingerprint_inputs": fingerprint_inputs,
        "shard_format": shard_format,
        "shard_suffix": shard_suffix,
        "config": config or {},
        "units": [{key: value for key, value in u.items() if key != "telemetry"} for u in units],
        "stats": {
            "num_units": len(units),
            "num_sequences": sum(u["num_sequences"] for u in units),
            "num_tokens": num_tokens,
            "total_bytes": total_bytes,
            "bytes_per_token": total_bytes / max(num_tokens, 1),
            "real_token_fraction": num_tokens / max(padded, 1),
            "documents": sum(u.get("documents", 0) for u in units),
            "empty_documents": sum(u.get("empty_documents", 0) for u in units),
            "short_windows_dropped": sum(u.get("short_windows_dropped", 0) for u in units),
            "telemetry": describe(merge_summaries([u.get("telemetry") for u in units])),
            "last_run": last_run or {"units": 0, "tokens": 0, "wall_time_s": 0.0, "tokens_per_s": 0.0, "failures": []},
        },
    }
    return validate_manifest(manifest)
