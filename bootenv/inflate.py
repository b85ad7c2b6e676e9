"""zstd decompression of a layout's pieces, reusing what each piece used to allocate anew.

A layout stream decompresses one piece (chunk) after another: 63 for synthetic web, 21
for LAMP's mysql. A new ZstdDecompressor per piece allocated its window again, and zstd
read the compressed piece through `read()`, a new 1 MiB bytes object per call. Large
allocations are served by mmap here (prefetch.steady_memory), so every one of them was
page-faulted and zeroed again: the first block of a piece took 1.9 ms to decompress
inside a layout, and 0.45 ms alone. An `Inflater` keeps its decompressor and reads the
compressed bytes into one buffer of its own, which zstd consumes before it asks for the
next block. Idle inflaters wait in a small free list for the next piece.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import zstandard

if TYPE_CHECKING:
    from bootenv.draining import Readable  # a type only: no import at run time

READ = 1 << 20  # compressed bytes zstd asks for at a time
KEEP = 2  # idle inflaters kept: one per piece a process lays out at once, and a spare


class _Refill:
    """`src`, read into one reused buffer. zstd's stream reader asks for more input only
    once it has consumed all of the last read's, and reads nothing after the end, so the
    buffer is never overwritten while zstd still needs what is in it."""

    def __init__(self, src: Readable, buf: bytearray) -> None:
        self._src = src
        self._buf = buf
        self._readinto = getattr(src, "readinto", None)

    def read(self, n: int = -1, /) -> bytes | memoryview:
        if self._readinto is None or not 0 <= n <= len(self._buf):
            return self._src.read(n)
        view = memoryview(self._buf)[:n]
        got: int = self._readinto(view)
        return view[:got]


class Inflater:
    """A zstd decompressor and its input buffer, for one piece at a time."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._buf = bytearray(READ)

    def reader(self, src: Readable) -> zstandard.ZstdDecompressionReader:
        """A reader of the decompressed bytes of `src`, every frame of it in turn."""
        return self._dctx.stream_reader(
            _Refill(src, self._buf),  # type: ignore[arg-type]  # any object with read()
            read_size=READ,
            read_across_frames=True,
            closefd=False,
        )


_idle: list[Inflater] = []
_idle_lock = threading.Lock()


def take() -> Inflater:
    """An idle inflater, or a new one."""
    with _idle_lock:
        return _idle.pop() if _idle else Inflater()


def give_back(inf: Inflater) -> None:
    """Done with `inf`: no thread may still be reading through it."""
    with _idle_lock:
        if len(_idle) < KEEP:
            _idle.append(inf)
