"""Work units (driver side, cheap: reads file sizes and Parquet footers only).

A work unit is one file plus a range in it. Its id is derived from the file's absolute URL (`expand_urls` makes
relative paths absolute), size and the range, so the same inputs always give the same units, and a rerun (from any
working directory, however the paths are spelled) finds the units it already committed. The cache's fingerprint is
`kdcache.identity`'s business.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from kdcache.capture.sources import parquet_row_groups
from kdcache.store import expand_urls

__all__ = ["WorkUnit", "plan_units", "record_file_format"]

PARQUET_SUFFIXES = (".parquet", ".pq")


def record_file_format(url: str) -> str:
    """How a chat / prompt_completion source file is read: "parquet" when its name ends in .parquet (or .pq), else
    "jsonl"."""
    return "parquet" if url.lower().endswith(PARQUET_SUFFIXES) else "jsonl"


@dataclass(frozen=True)
class WorkUnit:
    """A piece of input one actor processes whole: `url` and [start, stop) bytes (jsonl), a row group (parquet,
    start = row-group index), or the whole file (text)."""

    unit_id: str
    index: int  # position in the plan: the order of units in the manifest
    url: str
    kind: str  # "bytes" | "row_group" | "file"
    start: int
    stop: int
    size_bytes: int  # input bytes this unit covers (row groups: the file size divided evenly, for progress only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unit_id(url: str, file_size: int, kind: str, start: int, stop: int) -> str:
    return hashlib.blake2b(f"{url}\0{file_size}\0{kind}\0{start}\0{stop}".encode(), digest_size=10).hexdigest()


def plan_units(
    source: str | list[str],
    fmt: str,
    *,
    unit_bytes: int,
    storage_options: dict[str, Any] | None = None,
    files: list[tuple[str, int]] | None = None,
) -> list[WorkUnit]:
    """Split the input files into work units, in a deterministic order.

    Args:
        source: URL, glob, or list of them.
        fmt: "jsonl" | "parquet" | "text" | "chat" | "prompt_completion" (records of the last two are read from
            Parquet for a file name ending in .parquet, from jsonl otherwise: `record_file_format`).
        unit_bytes: target input bytes per jsonl unit.
        files: `expand_urls(source)` when the caller has it already (the job's fingerprint names these files).
    """
    units: list[WorkUnit] = []
    for url, size in expand_urls(source, storage_options) if files is None else files:
        kind = record_file_format(url) if fmt in ("chat", "prompt_completion") else fmt
        if kind == "jsonl":
            starts = list(range(0, max(size, 1), unit_bytes))
            for start in starts:
                stop = min(start + unit_bytes, size)
                units.append(
                    WorkUnit(_unit_id(url, size, "bytes", start, stop), 0, url, "bytes", start, stop, stop - start)
                )
        elif kind == "parquet":
            groups = parquet_row_groups(url, storage_options)
            for g, rows in enumerate(groups):
                if rows == 0:
                    continue
                unit = WorkUnit(
                    _unit_id(url, size, "row_group", g, g + 1), 0, url, "row_group", g, g + 1, size // len(groups)
                )
                units.append(unit)
        elif kind == "text":
            units.append(WorkUnit(_unit_id(url, size, "file", 0, size), 0, url, "file", 0, size, size))
        else:
            raise ValueError(f"data.format: unsupported format {fmt!r}")
    return [WorkUnit(**{**u.to_dict(), "index": i}) for i, u in enumerate(units)]
