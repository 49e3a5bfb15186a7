"""Shard file formats. Nothing outside this package knows how a shard file is laid out."""

from __future__ import annotations

__all__ = ["SHARD_FORMATS"]

SHARD_FORMATS = ("parquet",)
