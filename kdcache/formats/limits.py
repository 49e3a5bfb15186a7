"""Bounds on what a shard can make a reader allocate, checked before anything is decompressed (no pyarrow, no zarr).

A shard's bytes are checked against the size and checksum its manifest entry records, but a manifest can be
hostile too, and a few kilobytes of zstd can claim (and hold) gigabytes. So readers decompress only the columns /
arrays the format declares, and first check the size each of their pages or chunks claims to decompress to:

- Parquet: `parquet_page_bytes` walks a column chunk's page headers (Thrift compact protocol) and sums the
  uncompressed sizes they claim, which is what Arrow allocates page by page; the format module compares the sum with
  a bound linear in the token count the manifest declares.
- Zarr: `compressed_size_claim` reads the size a zstd frame header or a blosc header claims for a chunk (what
  numcodecs allocates), which must equal the chunk's size from its shape and data type.

Malformed input raises `ValueError` naming what is wrong; the callers add the shard's name.
"""

from __future__ import annotations

__all__ = ["compressed_size_claim", "parquet_page_bytes"]

_MAX_DEPTH = 16  # Thrift structs nested deeper than this are refused (PageHeader needs 3)
_ZSTD_MAGIC = 0xFD2FB528


class _Compact:
    """A cursor over Thrift compact-protocol bytes, enough to read a Parquet PageHeader and skip what it ignores."""

    def __init__(self, buf: memoryview, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("page header runs past its column chunk")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("page header holds an over-long varint")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def advance(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("page header runs past its column chunk")
        self.pos += n

    def skip(self, ttype: int, depth: int) -> None:
        """Skip one value of compact type `ttype` (booleans in a field header carry their value in the type)."""
        if ttype in (1, 2):
            return
        if ttype == 3:
            self.advance(1)
        elif ttype in (4, 5, 6):
            self.varint()
        elif ttype == 7:
            self.advance(8)
        elif ttype == 8:
            self.advance(self.varint())
        elif ttype in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if size > self.end - self.pos:  # every element takes at least one byte
                raise ValueError("page header holds a list longer than its bytes")
            for _ in range(size):
                self.advance(1) if elem in (1, 2) else self.skip(elem, depth + 1)
        elif ttype == 11:
            size = self.varint()
            if size:
                if 2 * size > self.end - self.pos:
                    raise ValueError("page header holds a map longer than its bytes")
                kinds = self.byte()
                for _ in range(size):
                    for kind in (kinds >> 4, kinds & 0x0F):
                        self.advance(1) if kind in (1, 2) else self.skip(kind, depth + 1)
        elif ttype == 12:
            self.struct(depth + 1, lambda field, kind: False)
        elif ttype == 13:  # uuid
            self.advance(16)
        else:
            raise ValueError(f"page header holds an unknown Thrift type {ttype}")

    def struct(self, depth: int, take) -> None:
        """Read a struct's fields: `take(field, type)` reads a field it wants and returns True; others are skipped."""
        if depth > _MAX_DEPTH:
            raise ValueError("page header nests too deep")
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            field = last + delta if delta else self.zigzag()
            last = field
            if not take(field, kind):
                self.skip(kind, depth)


def _page_header(buf: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(uncompressed_page_size, compressed_page_size, position after the header) of the PageHeader at `pos`."""
    cursor = _Compact(buf, pos, end)
    sizes: dict[int, int] = {}

    def take(field: int, kind: int) -> bool:
        if field in (2, 3) and kind == 5:  # i32 uncompressed_page_size, compressed_page_size
            sizes[field] = cursor.zigzag()
            return True
        return False

    cursor.struct(1, take)
    if 2 not in sizes or 3 not in sizes or sizes[2] < 0 or sizes[3] < 0:
        raise ValueError("page header lacks valid page sizes")
    return sizes[2], sizes[3], cursor.pos


def parquet_page_bytes(chunk: bytes | memoryview, limit: int) -> int:
    """The uncompressed bytes the pages of one Parquet column chunk claim, summed (`chunk`: the chunk's bytes, from its
    first page header to its end). Raises ValueError as soon as the sum passes `limit`, or for a malformed header or
    a page that runs past the chunk."""
    buf = memoryview(chunk).cast("B")
    pos, end, total = 0, len(buf), 0
    while pos < end:
        uncompressed, compressed, pos = _page_header(buf, pos, end)
        total += uncompressed
        if total > limit:
            raise ValueError(f"its pages claim more than {limit:,} bytes uncompressed")
        if pos + compressed > end:
            raise ValueError("a page runs past its column chunk")
        pos += compressed
    return total


def compressed_size_claim(data: bytes | memoryview, compressor: str) -> int:
    """The decompressed size a chunk's compressed bytes announce: a zstd frame's content size or a blosc header's
    nbytes (what the decoder allocates). Raises ValueError when the header is malformed or, for zstd, when the frame
    does not record its size."""
    buf = memoryview(data).cast("B")
    if compressor == "blosc":
        if len(buf) < 16:
            raise ValueError("blosc chunk shorter than its header")
        if int.from_bytes(buf[12:16], "little") != len(buf):
            raise ValueError("blosc header's compressed size differs from the chunk's")
        return int.from_bytes(buf[4:8], "little")
    if compressor == "zstd":
        if len(buf) < 6 or int.from_bytes(buf[0:4], "little") != _ZSTD_MAGIC:
            raise ValueError("not a zstd frame")
        descriptor = buf[4]
        size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
        pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
        width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
        if width == 0:
            raise ValueError("zstd frame does not record its content size")
        if pos + width > len(buf):
            raise ValueError("zstd frame header is truncated")
        value = int.from_bytes(buf[pos : pos + width], "little")
        return value + 256 if width == 2 else value
    raise ValueError(f"unknown compressor {compressor!r}")
