"""Block maps: which byte ranges of a filesystem image hold data, each with its sha256.

An OS sub-image is the zstd-compressed concatenation of its mapped ranges, in offset
order. A writer seeks over the holes (sparse writing) and verifies each range.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bootenv.manifest import ManifestError

MAX_IMAGE = 1 << 63  # bytes: an image is at most what a file or device offset can address
_HEX = re.compile(r"[0-9a-f]{64}")
MAX_RANGE = 8 << 20  # split long extents so each range is verified soon after it lands


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class Range:
    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class BlockMap:
    image_size: int
    block_size: int
    ranges: tuple[Range, ...]

    @property
    def mapped(self) -> int:
        return sum(r.length for r in self.ranges)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "image_size": self.image_size,
                "block_size": self.block_size,
                "ranges": [[r.offset, r.length, r.sha256] for r in self.ranges],
            },
            separators=(",", ":"),
        )


def parse_blockmap(text: str | bytes) -> BlockMap:
    """Parse a block map strictly: ranges sorted, aligned, inside the image, not overlapping."""
    try:
        doc: Any = json.loads(text)
    except RecursionError as exc:
        raise ManifestError("block map is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"block map is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"version", "image_size", "block_size", "ranges"}:
        raise ManifestError("block map has missing or unknown keys")
    if type(doc["version"]) is not int or doc["version"] != 1:  # not True, not 1.0
        raise ManifestError(f"unsupported block map version {doc['version']!r}")
    size, bs = doc["image_size"], doc["block_size"]
    # type(), not isinstance(): a bool is an int. Under 2**63: a file or device offset.
    if (
        type(size) is not int
        or not 0 < size < MAX_IMAGE
        or type(bs) is not int
        or bs not in (1024, 2048, 4096)
    ):
        raise ManifestError("block map sizes are invalid")
    ranges: list[Range] = []
    end = 0
    for item in doc["ranges"] if isinstance(doc["ranges"], list) else [None]:
        if not (isinstance(item, list) and len(item) == 3):
            raise ManifestError("block map range must be [offset, length, sha256]")
        off, length, digest = item
        ok = type(off) is int and type(length) is int and isinstance(digest, str)
        if (
            not ok
            or off < end
            or length <= 0
            or off % bs
            or off + length > size
            or not _HEX.fullmatch(digest)
        ):
            raise ManifestError(f"block map range {item!r} is invalid")
        ranges.append(Range(off, length, digest))
        end = off + length
    return BlockMap(size, bs, tuple(ranges))


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data regions of a sparse file, via SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def plan_ranges(extents: list[tuple[int, int]], block_size: int, size: int) -> list[tuple[int, int]]:
    """Align extents to blocks, merge neighbours and split long ones (pure)."""
    merged: list[list[int]] = []
    for off, length in extents:
        start = off - off % block_size
        end = min(-(-(off + length) // block_size) * block_size, size)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = []
    for start, end in merged:
        for off in range(start, end, MAX_RANGE):
            out.append((off, min(MAX_RANGE, end - off)))
    return out


def pack_image(image: Path, out: Writable, *, block_size: int, level: int = 3) -> BlockMap:
    """Compress the mapped ranges of `image` into `out`; return the block map."""
    import zstandard

    size = image.stat().st_size
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    ranges: list[Range] = []
    # One buffer, read into again and again: a fresh 1 MiB object per read page-faults
    # every 4 KiB of it.
    buf = memoryview(bytearray(1 << 20))
    with open(image, "rb") as src, cctx.stream_writer(out, closefd=False) as zout:  # type: ignore[arg-type]
        extents = list(data_extents(src.fileno(), size))
        for off, length in plan_ranges(extents, block_size, size):
            src.seek(off)
            digest = hashlib.sha256()
            left = length
            while left:
                n = src.readinto(buf[: min(left, len(buf))])
                if not n:
                    raise OSError(f"{image} shrank while packing")
                digest.update(buf[:n])
                zout.write(buf[:n])
                left -= n
            ranges.append(Range(off, length, digest.hexdigest()))
    return BlockMap(size, block_size, tuple(ranges))
