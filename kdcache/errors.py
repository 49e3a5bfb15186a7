"""Every exception kdcache raises on purpose. Each message names the file, unit, config key or URI at fault."""

from __future__ import annotations

__all__ = [
    "CacheMismatchError",
    "ConfigError",
    "CorruptShardError",
    "JobFailed",
    "KdcacheError",
    "SourceError",
    "StoreError",
    "SubmitError",
]


class KdcacheError(Exception):
    """Base class of every error kdcache raises on purpose."""


class ConfigError(KdcacheError, ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""


class SourceError(KdcacheError, ValueError):
    """An input record is malformed; the message names the file and line or row."""


class CacheMismatchError(KdcacheError):
    """An existing cache was made with a different fingerprint, tokenizer or vocabulary."""


class CorruptShardError(KdcacheError):
    """A shard is missing, truncated or fails its checksum."""


class StoreError(KdcacheError):
    """A storage operation failed after its retries; the message names the key."""


class JobFailed(KdcacheError):
    """A unit failed more than `cluster.max_retries` times, failed on bad input, or no actor could start."""


class SubmitError(KdcacheError):
    """The job could not be submitted, or (with --wait) did not succeed."""
