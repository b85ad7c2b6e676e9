"""write-os's stream of the data blob: sha256 of the compressed bytes → zstd → per-range
sha256 → the target at the range's offset.

Holes of the block map are never written. Three threads share the work, as the three
processes of `curl | zstd -dc | dd` do: fetch and decompress (prefetch.py), hash (the
caller), write (writebehind.py). Memory stays flat: three 4 MiB buffers and the held-back
header, the first MiB of the image, which goes to `Held` instead of the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from bootenv.blockmap import BlockMap, Range
from bootenv.errors import VerificationError
from bootenv.log import Progress
from bootenv.manifest import Blob
from bootenv.ostarget import ALIGN, HEADER, Target
from bootenv.prefetch import Prefetch
from bootenv.writebehind import WriteBehind

CHUNK = 4 << 20  # decompressed bytes per buffer
BUFFERS = 3  # one being filled and hashed, one being written, one spare
READ = 1 << 20  # compressed bytes per network read
HASH_QUEUE = 4  # network reads waiting for the compressed stream's sha256 (4 MiB)


class HashingReader:
    """Reads exactly `blob.size` bytes, hashing them; `verify()` checks size and sha256.

    With `behind`, the hashing runs on a thread of its own (sha256 releases the GIL):
    the reads come from the thread that decompresses, which was write-os's busiest
    (py-spy on LAMP's OS: socket reads, this sha256 and zstd took 90% of its samples,
    the sha256 a quarter of them). At most HASH_QUEUE reads wait to be hashed."""

    def __init__(self, raw: BinaryIO, blob: Blob, name: str, *, behind: bool = False) -> None:
        self.raw = raw
        self.blob = blob
        self.name = name
        self.count = 0
        self._hash = hashlib.sha256()
        self._todo: queue.Queue[bytes | None] | None = None
        self._hasher: threading.Thread | None = None
        if behind:
            self._todo = queue.Queue(maxsize=HASH_QUEUE)
            self._hasher = threading.Thread(target=self._hash_behind, name="hash", daemon=True)
            self._hasher.start()

    def _hash_behind(self) -> None:
        assert self._todo is not None
        while (data := self._todo.get()) is not None:
            self._hash.update(data)

    def read(self, n: int = -1) -> bytes:
        left = self.blob.size - self.count
        if n < 0 or n > left:
            n = left
        data = self.raw.read(n) if n else b""
        if self._todo is not None:
            self._todo.put(data)
        else:
            self._hash.update(data)
        self.count += len(data)
        return data

    def close(self) -> None:
        """Stop the hashing thread (once it has hashed what it was given)."""
        if self._todo is not None and self._hasher is not None:
            self._todo.put(None)
            self._hasher.join()
        self._todo = self._hasher = None

    def verify(self) -> None:
        while self.read(READ):  # whatever zstd left unread (there should be nothing)
            pass
        self.close()
        if self.count != self.blob.size:
            raise VerificationError(f"{self.name} is truncated: {self.count} of {self.blob.size} bytes")
        if self.raw.read(1):
            raise VerificationError(f"{self.name} is longer than the manifest says ({self.blob.size} bytes)")
        if self._hash.hexdigest() != self.blob.sha256:
            raise VerificationError(f"{self.name} does not match its sha256 in the manifest")


@contextmanager
def aligned_buffer(size: int) -> Iterator[memoryview]:
    # An anonymous mapping is page-aligned, which O_DIRECT requires of the buffer.
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    try:
        yield view
    finally:
        # Slices may still be alive in a traceback's frames; the GC then unmaps it.
        with contextlib.suppress(BufferError):
            view.release()
            buf.close()


@dataclass(frozen=True)
class Held:
    """The first MiB of the image, kept in an aligned buffer until everything verified."""

    buf: memoryview
    pieces: list[tuple[int, int]]


def stream(reader: HashingReader, bmap: BlockMap, target: Target, header: Held, label: str | None) -> None:
    """Decompress and write every range, except the header's, which go to `header`."""
    bar = Progress(f"writing {label}", bmap.mapped) if label else None
    dctx = zstandard.ZstdDecompressor()
    try:
        with (
            dctx.stream_reader(reader, read_size=READ, read_across_frames=True, closefd=False) as zin,  # type: ignore[arg-type]
            Prefetch(zin) as ahead,  # decompress on a thread while this one hashes
            aligned_buffer(CHUNK * BUFFERS) as pool,
            WriteBehind(target.write, _split(pool, BUFFERS)) as behind,  # and writes on another
        ):
            fill = _Fill(behind)
            try:
                for rng in bmap.ranges:
                    _stream_range(ahead, rng, fill, header, bar, reader.name)
                if ahead.read(1):
                    raise VerificationError(f"{reader.name} holds more data than its block map")
            finally:  # on a failure too: what one thread would have written by then
                fill.submit()
            behind.finish()
    except zstandard.ZstdError as exc:
        raise VerificationError(f"{reader.name} is not a valid zstd stream: {exc}") from exc
    finally:
        if bar:
            bar.close()


def _split(pool: memoryview, n: int) -> list[memoryview]:
    size = len(pool) // n
    return [pool[i * size : (i + 1) * size] for i in range(n)]


class _Fill:
    """The buffer being filled: pieces of ranges, each starting aligned, and their writes."""

    def __init__(self, behind: WriteBehind) -> None:
        self.behind = behind
        self.buf = behind.buffer()
        self.used = 0
        self.writes: list[tuple[int, int, int]] = []

    def room(self) -> memoryview:
        """Where the next piece goes (a fresh buffer once this one is full)."""
        if self.used == len(self.buf):
            self.submit()
            self.buf = self.behind.buffer()
        return self.buf[self.used :]

    def add(self, length: int, write_from: int, offset: int) -> None:
        """The piece of `length` bytes just put at `room()`; its bytes from `write_from`
        on go to the target at `offset`."""
        if write_from < length:
            self.writes.append((self.used + write_from, length - write_from, offset))
        # The next piece starts aligned, as O_DIRECT wants of the memory it writes from.
        self.used = min(len(self.buf), -(-(self.used + length) // ALIGN) * ALIGN)

    def submit(self) -> None:
        if not self.used:  # nothing in it (or it went already)
            return
        self.behind.submit(self.buf, self.writes)  # with no writes, it just comes back free
        self.writes = []
        self.used = 0


def _stream_range(
    zin: Prefetch, rng: Range, fill: _Fill, header: Held, bar: Progress | None, name: str
) -> None:
    digest = hashlib.sha256()
    offset, left = rng.offset, rng.length
    while left:
        room = fill.room()
        want = min(left, len(room))
        got = 0
        while got < want:
            data = zin.view(want - got)  # lent until the next view(): copied at once
            n = len(data)
            if not n:
                raise VerificationError(
                    f"the image decompressed from {name} ended early, at image byte {offset}"
                )
            room[got : got + n] = data
            got += n
        piece = room[:got]
        digest.update(piece)
        held = max(0, min(HEADER - offset, got))
        if held:
            header.buf[offset : offset + held] = piece[:held]
            header.pieces.append((offset, held))
        fill.add(got, held, offset + held)
        offset += got
        left -= got
        if bar:
            bar.update(got)
    if digest.hexdigest() != rng.sha256:
        raise VerificationError(
            f"{name}: the image's range at byte {rng.offset} ({rng.length} bytes) does not match its sha256"
        )
