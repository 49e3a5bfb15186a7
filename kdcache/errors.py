"""Exception types raised by kdcache. Every message names the file, unit or config key at fault."""

from __future__ import annotations

__all__ = ["CacheMismatchError", "ConfigError", "CorruptShardError", "KdcacheError", "SourceError"]


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
