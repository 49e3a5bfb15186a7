"""The cache's layout and its manifest, `index.json`: the one entry point for readers.

Layout under the cache root (all keys relative, see docs/FORMAT.md):

    fingerprint.json              written first, exclusively: the cache's identity (refuses a different job)
    shards/<unit_id>-<attempt>.parquet   one immutable data object per work unit attempt
    commits/<unit_id>.json        commit record, created exclusively after its shard is complete; first one wins
    index.json                    the manifest, written last by the driver from the commit records

Readers only read `index.json` and the shards it names; they never list the store. A manifest is input like any
other: `validate_manifest` checks the type and range of everything a reader uses (and that the counts are possible
for the shard sizes) before anything is allocated from it, so a hostile or damaged `index.json` is refused with a
message naming the key and unit, never a raw exception or an allocation it dictates.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from typing import Any

from kdcache.codec import CodecParams
from kdcache.errors import CacheMismatchError, CorruptShardError, KdcacheError, StoreError
from kdcache.store import Store, safe_relpath
from kdcache.telemetry import describe, merge_summaries

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_KEY",
    "FINGERPRINT_KEY",
    "MAX_SHARD_BYTES",
    "MAX_TOKENS_PER_BYTE",
    "build_manifest",
    "commit_key",
    "read_manifest",
    "shard_checksum_error",
    "shard_key",
    "validate_manifest",
]

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 3
INDEX_KEY = "index.json"
FINGERPRINT_KEY = "fingerprint.json"
COMMITS_DIR = "commits"
SHARDS_DIR = "shards"
UNIT_KEYS = ("unit_id", "path", "bytes", "sha256", "num_sequences", "num_tokens", "num_target_tokens")
COUNT_KEYS = ("num_sequences", "num_tokens", "num_target_tokens")
MAX_SHARD_BYTES = 1 << 40  # 1 TiB: shards are ~64 MiB-1 GiB (docs/FORMAT.md section 9)
# No shard stores fewer than 1/16 byte per token (real ones: 1-300 bytes: the input ids alone take ~1-2), so a unit
# declaring more tokens than 16 per byte of its shard is refused before anything is sized by its counts.
MAX_TOKENS_PER_BYTE = 16
MAX_VOCAB = 1 << 31  # ids are held as int32 steps by the reader
MAX_TEMPERATURES = 64
MAX_SAMPLES = 255  # draw counts are uint8
TARGET_MODES = ("topk", "sample", "hybrid")


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, what: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) in [low, high], else a ValueError naming `what`."""
    if not _is_int(value) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ValueError(f"{what} must be an integer in [{low}, {high:,}], got {shown}")
    return value


def _text(value: Any, what: str, limit: int = 4096) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > limit
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ValueError(f"{what} must be a non-empty string of printable characters, got {str(value)[:60]!r}")
    return value


def _section(parent: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{what}{key} must be a JSON object, got {type(value).__name__}")
    return value


def _check_unit(unit: Any, index: int) -> None:
    """Types and bounds of one unit entry (ValueError naming the key)."""
    if not isinstance(unit, dict):
        raise ValueError(f"units[{index}] must be a JSON object, got {type(unit).__name__}")
    missing = [key for key in UNIT_KEYS if key not in unit]
    if missing:
        raise ValueError(f"units[{index}] ({str(unit.get('unit_id'))[:40]!r}) lacks {missing}")
    name = f"units[{index}] ({_text(unit['unit_id'], f'units[{index}].unit_id', 200)!r})"
    try:
        safe_relpath(_text(unit["path"], f"{name}.path"))
    except ValueError as exc:
        raise ValueError(f"{name}.path: {exc}") from None
    size = _int(unit["bytes"], f"{name}.bytes", 0, MAX_SHARD_BYTES)
    sha = unit["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{name}.sha256 must be 64 lowercase hex digits")
    if "crc32" in unit:
        _int(unit["crc32"], f"{name}.crc32", 0, 2**32 - 1)
    tokens = _int(unit["num_tokens"], f"{name}.num_tokens", 0, MAX_TOKENS_PER_BYTE * size)
    _int(unit["num_target_tokens"], f"{name}.num_target_tokens", 0, tokens)
    _int(unit["num_sequences"], f"{name}.num_sequences", 1 if tokens else 0, tokens)


def _check_inputs(inputs: dict[str, Any]) -> None:
    """Types and bounds of what readers take from fingerprint_inputs (ValueError naming the key)."""
    teacher = _section(inputs, "teacher", "fingerprint_inputs.")
    vocab = _int(teacher.get("padded_vocab_size"), "fingerprint_inputs.teacher.padded_vocab_size", 1, MAX_VOCAB)
    tokenizer = _section(inputs, "tokenizer", "fingerprint_inputs.")
    _int(tokenizer.get("vocab_size"), "fingerprint_inputs.tokenizer.vocab_size", 0, MAX_VOCAB)
    targets = _section(inputs, "targets", "fingerprint_inputs.")
    mode = targets.get("mode")
    if mode not in TARGET_MODES:
        raise ValueError(
            f"fingerprint_inputs.targets.mode must be one of {list(TARGET_MODES)}, got {str(mode)[:40]!r}"
        )
    _int(targets.get("k"), "fingerprint_inputs.targets.k", 0 if mode == "sample" else 1, vocab)
    if mode == "sample" and targets["k"] != 0:
        raise ValueError("fingerprint_inputs.targets.k must be 0 in sample mode")
    temps = targets.get("temperatures")
    if (
        not isinstance(temps, list)
        or not 1 <= len(temps) <= MAX_TEMPERATURES
        or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in temps
        )
        or temps[0] != 1.0
    ):
        raise ValueError(
            f"fingerprint_inputs.targets.temperatures must be a list of 1 to {MAX_TEMPERATURES} positive numbers "
            "starting with 1.0"
        )
    if mode != "topk":
        _int(targets.get("samples"), "fingerprint_inputs.targets.samples", 1, MAX_SAMPLES)
    codec = _section(inputs, "codec", "fingerprint_inputs.")
    try:
        CodecParams.from_dict(codec)
    except (ValueError, TypeError, KeyError) as exc:
        raise CacheMismatchError(f"fingerprint_inputs.codec: {exc}") from None


def validate_manifest(manifest: Any, where: str = INDEX_KEY) -> dict[str, Any]:
    """Check a manifest before a reader uses it: the format and its version, `complete`, and the type and range of
    everything readers read (fingerprint_inputs' targets, teacher, tokenizer and codec; each unit's keys, a path
    inside the cache root, its byte size and counts, which must be possible for that size; stats' shape).

    Returns the manifest. Raises `CacheMismatchError` for another format version or codec, `KdcacheError` for an
    incomplete cache, `CorruptShardError` for anything malformed; each message starts with `where`.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptShardError(f"{where}: not a kdcache manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise CacheMismatchError(
            f"{where}: cache format version {str(version)[:20]} is not supported by this kdcache, which reads version "
            f"{FORMAT_VERSION} only; re-create the cache with this kdcache (`kdcache cache CONFIG` into a new "
            "output.uri), or read it with the kdcache release that wrote it"
        )
    for key in ("fingerprint", "fingerprint_inputs", "units", "stats", "complete", "shard_format"):
        if key not in manifest:
            raise CorruptShardError(f"{where}: manifest lacks {key!r}")
    if manifest["complete"] is not True:
        raise KdcacheError(
            f"{where}: the manifest marks the cache incomplete (complete: {str(manifest['complete'])[:20]}); readers "
            "refuse it: rerun the job that writes it"
        )
    try:
        _text(manifest["fingerprint"], "fingerprint", 256)
        _text(manifest["shard_format"], "shard_format", 64)
        if not isinstance(manifest["fingerprint_inputs"], dict):
            raise ValueError("fingerprint_inputs must be a JSON object")
        _check_inputs(manifest["fingerprint_inputs"])
        _check_units_and_stats(manifest)
    except CacheMismatchError as exc:
        raise CacheMismatchError(f"{where}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise CorruptShardError(f"{where}: {exc}") from None
    return manifest


def _check_units_and_stats(manifest: dict[str, Any]) -> None:
    units = manifest["units"]
    if not isinstance(units, list):
        raise ValueError(f"units must be a list, got {type(units).__name__}")
    for index, unit in enumerate(units):
        _check_unit(unit, index)
    stats = manifest["stats"]
    if not isinstance(stats, dict):
        raise ValueError(f"stats must be a JSON object, got {type(stats).__name__}")
    for key in ("num_units", "num_sequences", "num_tokens", "total_bytes"):
        if key in stats:
            _int(stats[key], f"stats.{key}", 0, 2**62)


def read_manifest(store: Store) -> dict[str, Any] | None:
    """The validated manifest (`validate_manifest`), or None if the cache has none yet.

    Raises:
        CorruptShardError: `index.json` cannot be read (a directory, say) or is not JSON (or nests too deep).
    """
    url = store.url(INDEX_KEY)
    try:
        raw = store.read_bytes(INDEX_KEY)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise CorruptShardError(f"{url}: cannot read the manifest ({type(exc).__name__}: {exc})") from None
    except StoreError as exc:
        if not isinstance(exc.__cause__, (IsADirectoryError, NotADirectoryError)):
            raise  # access denied, an outage: its own message says what failed and what to do
        raise CorruptShardError(f"{url}: cannot read the manifest ({exc})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        detail = "nests too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CorruptShardError(f"{url}: invalid JSON ({detail})") from None
    return validate_manifest(manifest, url)


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
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a complete manifest from per-unit entries (each with at least UNIT_KEYS) in plan order.

    A unit entry without `num_target_tokens` has a target at every position (it gets `num_tokens`). Per-unit
    `telemetry` histograms are merged into `stats.telemetry` and left out of the unit entries (they stay in the commit
    records): ~2 KB per unit that every reader would otherwise download.

    ``provenance`` (what the cache came from, for people: the teacher's license, a generated cache's generation
    settings and throughput; `kdcache.capture.job.build_provenance`) is recorded as it is, when given.
    """
    from kdcache import __version__

    units = [{"num_target_tokens": u.get("num_tokens")} | u for u in units]
    num_tokens = sum(u["num_tokens"] for u in units)
    num_target_tokens = sum(u["num_target_tokens"] for u in units)
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
            "num_target_tokens": num_target_tokens,
            "total_bytes": total_bytes,
            "bytes_per_token": total_bytes / max(num_tokens, 1),
            "target_token_fraction": num_target_tokens / max(num_tokens, 1),
            "real_token_fraction": num_tokens / max(padded, 1),
            "documents": sum(u.get("documents", 0) for u in units),
            "empty_documents": sum(u.get("empty_documents", 0) for u in units),
            "short_windows_dropped": sum(u.get("short_windows_dropped", 0) for u in units),
            "telemetry": describe(merge_summaries([u.get("telemetry") for u in units])),
            "last_run": last_run or {"units": 0, "tokens": 0, "wall_time_s": 0.0, "tokens_per_s": 0.0, "failures": []},
        },
    }
    if provenance is not None:
        manifest["provenance"] = provenance
    try:
        _check_units_and_stats(manifest)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"build_manifest: {exc}") from None
    return manifest
