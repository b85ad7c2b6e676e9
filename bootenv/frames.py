"""Compress a tar stream into zstd frames cut at member boundaries: the chunks of a component.

A component archive is one file that any zstd and tar can read end to end, but it is
also a sequence of independent frames, each holding whole tar members, recorded in the
manifest with their offset, size and sha256. A layout stream can fetch one frame with
an HTTP range, check its hash, and lay its members out without the rest: so a large
component is spread over every stream, not tied to one.

Where frames are cut:
- right after the last directory (capture puts directories first), so the first chunk
  is the directory skeleton and later chunks never have to create a directory;
- never before a hard link (capture keeps a hard link next to its target), so a link
  always finds its target in the same chunk;
- otherwise once a frame holds `target` bytes of tar.

A frame larger than BLOCKS_OVER also records the sha256 of each VERIFY_BLOCK of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import zstandard

from bootenv.manifest import Chunk
from bootenv.paxread import BLOCK, ArchiveError, parse_pax

DEFAULT_TARGET = 8 << 20
# A chunk over BLOCKS_OVER compressed bytes (one large file, typically) also pins each
# VERIFY_BLOCK of it, so layout can check it as it arrives instead of only once it is
# all in (fetchahead.py). Smaller chunks are fetched whole, in memory, and checked whole.
VERIFY_BLOCK = 4 << 20
BLOCKS_OVER = 32 << 20
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_HEADERS = (b"x", b"g", b"L", b"K")


class TarSource(Protocol):
    """A tar stream: `tar -c`'s stdout, or a file."""

    def read(self, n: int = -1, /) -> bytes: ...
    def readinto(self, buf: memoryview, /) -> int: ...


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> int: ...


@dataclass
class _Counting:
    """Forward compressed bytes to the sink, hashing and counting the current chunk; a
    chunk of more than `block_min` bytes pins its blocks, so it is hashed block by block
    too. Until a chunk grows past `block_min` its bytes are held (a copy) rather than
    hashed a second time: most chunks never do (8 MiB of tar each), and on a machine
    without SHA instructions each pass of sha256 over the compressed bytes cost as much
    CPU as a sixth of a capture (three passes: the blob's, the chunk's, its blocks')."""

    sink: Sink
    block_size: int
    block_min: int
    offset: int = 0
    size: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    block: hashlib._Hash = field(default_factory=hashlib.sha256)
    blocks: list[str] = field(default_factory=list)
    held: bytearray = field(default_factory=bytearray)  # the chunk, while <= block_min
    hashed: int = 0  # bytes of the chunk hashed block by block

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.size <= self.block_min:
            self.held += data
        else:
            if self.held:
                self._hash_blocks(memoryview(self.held))
                self.held = bytearray()
            self._hash_blocks(memoryview(data))
        return self.sink.write(data)

    def _hash_blocks(self, view: memoryview) -> None:
        while view:
            part = view[: self.block_size - self.hashed % self.block_size]
            self.block.update(part)
            self.hashed += len(part)
            view = view[len(part) :]
            if self.hashed % self.block_size == 0:
                self.blocks.append(self.block.hexdigest())
                self.block = hashlib.sha256()

    def cut(self, raw_size: int) -> Chunk:
        blocks: tuple[str, ...] = ()
        if self.size > self.block_min:
            if self.hashed % self.block_size:
                self.blocks.append(self.block.hexdigest())
            blocks = tuple(self.blocks)
        chunk = Chunk(
            self.offset,
            self.size,
            raw_size,
            self.sha.hexdigest(),
            self.block_size if blocks else 0,
            blocks,
        )
        self.offset += self.size
        self.size = self.hashed = 0
        self.sha = hashlib.sha256()
        self.block = hashlib.sha256()
        self.blocks = []
        self.held = bytearray()
        return chunk


def compress_tar(
    src: TarSource,
    sink: Sink,
    *,
    level: int,
    target: int = DEFAULT_TARGET,
    progress: Callable[[int], None] | None = None,
    block_size: int = VERIFY_BLOCK,
    block_min: int = BLOCKS_OVER,
) -> tuple[int, tuple[Chunk, ...]]:
    """Compress the tar stream `src` into `sink` as chunked frames; return (raw size, chunks)."""
    frames = _Frames(_Counting(sink, block_size, block_min), level, progress)
    _copy_members(src, frames, target)
    chunks = frames.finish()
    if len(chunks) == 1:
        return frames.total, ()  # one piece: the blob itself says it all
    return frames.total, tuple(chunks)


class _Frames:
    """The zstd frames written so far: tar bytes go into the current one, which `cut`
    ends, recording its chunk. `emit` runs for every member and every MiB of data, so
    it touches no more than it must: the total is summed once per frame."""

    def __init__(self, counting: _Counting, level: int, progress: Callable[[int], None] | None) -> None:
        self.counting = counting
        cctx = zstandard.ZstdCompressor(level=level, threads=-1)
        self.writer = cctx.stream_writer(counting, closefd=False)  # type: ignore[arg-type]
        self.write = self.writer.write
        self.progress = progress
        self.chunks: list[Chunk] = []
        self.raw = 0  # tar bytes in the current frame
        self.total = 0  # ... in the frames before it

    def emit(self, data: bytes | memoryview) -> None:
        self.write(data)
        self.raw += len(data)
        if self.progress:
            self.progress(len(data))

    def cut(self) -> None:
        if self.raw:
            self.writer.flush(zstandard.FLUSH_FRAME)
            self.chunks.append(self.counting.cut(self.raw))
            self.total += self.raw
            self.raw = 0

    def finish(self) -> list[Chunk]:
        """End the last frame: the chunks, all of them (`total` is then every tar byte)."""
        self.writer.flush(zstandard.FLUSH_FRAME)
        self.total += self.raw
        if self.raw:
            self.chunks.append(self.counting.cut(self.raw))
        return self.chunks


def _copy_members(src: TarSource, frames: _Frames, target: int) -> None:
    """Copy each member of `src` whole into `frames`, cutting frames as the module
    docstring says, then the end of the archive."""
    take, pending, buf = _reader(src)
    emit = frames.emit
    cuttable = True  # a global pax header would apply to later chunks: never cut after one
    in_dirs = False
    while True:
        # One member: its extended headers, its own header, its data.
        header = take(BLOCK)
        if header == bytes(BLOCK):  # end of archive: the rest (zero padding) ends the last chunk
            _copy_end(src, header, pending, emit)
            return
        member = [header]
        pax: dict[str, bytes] = {}
        while header[156:157] in _HEADERS:
            size = _size(header)
            body = take(_padded(size))
            member.append(body)
            if header[156:157] == b"x":
                pax = parse_pax(body[:size])
            elif header[156:157] == b"g":
                cuttable = False
            header = take(BLOCK)
            member.append(header)
        typeflag = header[156:157]
        size = 0 if typeflag in _NO_DATA else _size(header)
        if "size" in pax and typeflag not in _NO_DATA:
            size = int(pax["size"])
        is_dir = typeflag == b"5"
        # Chunk 0 is the directory skeleton, whatever it weighs (a layout refuses a
        # directory in a later chunk): cut after it, and past the target before any
        # member but a directory (nor a hard link, which must be with its target).
        if cuttable and typeflag != b"1" and not is_dir and (in_dirs or frames.raw >= target):
            frames.cut()
        in_dirs = is_dir
        for part in member:
            emit(part)
        left = _padded(size)
        if pending and left:  # what the headers' reads brought in already
            k = min(left, len(pending))
            emit(memoryview(pending)[:k])  # the view is gone once emit returns ...
            del pending[:k]  # ... so pending may shrink
            left -= k
        while left:  # the rest straight from the source, into one reused buffer
            n = src.readinto(buf[: min(left, len(buf))])
            if not n:
                raise ArchiveError("tar stream is truncated")
            emit(buf[:n])
            left -= n


def _reader(src: TarSource) -> tuple[Callable[[int], bytes], bytearray, memoryview]:
    """`take(n)`: the next `n` bytes of `src`; `pending`: what it read ahead of them;
    `buf`: the buffer it reads into, which a member's data reuses."""
    pending = bytearray()  # read ahead of the member being copied
    buf = memoryview(bytearray(1 << 20))

    def take(n: int) -> bytes:
        while len(pending) < n:
            got = src.readinto(buf)
            if not got:
                raise ArchiveError("tar stream is truncated")
            pending.extend(buf[:got])
        out = bytes(pending[:n])
        del pending[:n]
        return out

    return take, pending, buf


def _copy_end(src: TarSource, header: bytes, pending: bytearray, emit: Callable[[bytes], None]) -> None:
    """The end of the archive, in the last frame: its first zero block (`header`), what
    was read ahead of it, and the rest of the source (zero padding)."""
    emit(header)
    while rest := src.read(1 << 20):
        emit(bytes(pending) + rest)
        pending.clear()
    if pending:
        emit(bytes(pending))
        pending.clear()


def _size(header: bytes) -> int:
    field_ = header[124:136]
    if field_[0] & 0x80:  # base-256
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _padded(size: int) -> int:
    return size + (-size % BLOCK)
