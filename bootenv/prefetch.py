"""Read ahead of a stream on a thread: a stream's decompression overlaps its file writes.

`zstd -dc | tar -x` runs two processes, so decompressing and writing files overlap. A
layout stream is one process; this gives it the same pipeline. Fetching, hashing and
zstd decompression (all of which release the GIL) run on a reader thread that keeps up
to `depth` blocks ready, while the caller parses the archive and makes the files. The
blocks are lent, not given: the caller reads each one in place and hands it back.
An error on the reader thread is raised to the caller at the read that would have hit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import sys
import threading
from types import TracebackType
from typing import Protocol

BLOCK = 1 << 20
# Blocks kept ready. Four hold a zstd decompressor's lead over the parser (4 MiB is about
# 4 ms of decompression); eight gained nothing in interleaved runs and let the peak RSS
# wander with the run's length (layout of 1 GB vs 4 GB: 33.7 vs 40.0 MiB with eight,
# 34.2 vs 36.1 with four).
DEPTH = 4
JOIN_TIMEOUT = 5.0  # how long close() waits for the reader thread
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def steady_memory() -> None:
    """Keep large buffers (a read of 1 MiB, a chunk's block) in mmap'ed memory that goes
    back to the system when freed. glibc otherwise raises its mmap threshold after the
    first such free and serves later ones from the heap, whose peak then wanders from run
    to run (measured: layout's peak RSS 48-56 MiB by chance; with this, 48 MiB for 1 and
    4 GB). The read-ahead blocks are kept and reused instead (Prefetch)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)


_spare: list[bytearray] = []  # buffers of closed Prefetches, for the next ones
_spare_lock = threading.Lock()


def _take(block: int, n: int) -> list[bytearray]:
    mine: list[bytearray] = []
    rest: list[bytearray] = []
    with _spare_lock:
        for buf in _spare:  # by identity: list.remove would compare contents
            (mine if len(buf) == block and len(mine) < n else rest).append(buf)
        _spare[:] = rest
    return mine + [bytearray(block) for _ in range(n - len(mine))]


def _give(bufs: list[bytearray]) -> None:
    with _spare_lock:
        _spare.extend(bufs)
        del _spare[: max(0, len(_spare) - 2 * (DEPTH + 1))]  # two Prefetches' worth at most


class Source(Protocol):
    def readinto(self, buf: bytearray, /) -> int: ...


class Prefetch:
    """Reads ahead of the caller into a fixed pool of `depth + 1` reused buffers.

    Each block is read straight into a buffer the caller has handed back, so a block costs
    no allocation: a fresh 1 MiB bytes object per block page-faulted every 4 KiB of it
    (measured on write-os of LAMP: 263 000 faults and 1.9 s of system time, against 63 000
    and 0.75 s with the pool). `view()` lends the caller part of the current block. The
    buffers outlive the Prefetch: the next one in the process takes them over, as a
    layout stream makes one per piece.
    """

    def __init__(self, src: Source, *, block: int = BLOCK, depth: int = DEPTH) -> None:
        self._src = src
        # Filled blocks (buffer, length) in order; an error or the end (length 0) last.
        self._queue: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._pool = _take(block, depth + 1)  # `depth` ready while the caller holds one more
        for buf in self._pool:
            self._free.put(buf)
        self._stop = threading.Event()
        self._held: bytearray | None = None  # the block the caller is reading
        self._view = memoryview(b"")
        self._pos = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    buf = self._free.get(timeout=0.1)
                except queue.Empty:
                    continue
                n = self._src.readinto(buf)
                self._queue.put((buf, n))
                if not n:
                    return
        except BaseException as exc:  # handed to the reader, who raises it
            self._queue.put(exc)

    def view(self, n: int) -> memoryview:
        """Up to `n` bytes of the stream (at least one, unless it has ended), lent: the
        view is valid only until the next `view()`, `read()` or `close()`."""
        if self._stop.is_set():  # its buffers may belong to another Prefetch by now
            raise ValueError("read from a closed Prefetch")
        if self._pos == len(self._view) and not self._done:
            self._give_back()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            buf, got = item
            if got:
                self._held, self._view, self._pos = buf, memoryview(buf)[:got], 0
            else:
                self._done = True
                self._free.put(buf)
        out = self._view[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _give_back(self) -> None:
        if self._held is not None:
            self._free.put(self._held)
            self._held, self._view, self._pos = None, memoryview(b""), 0

    def read(self, n: int = -1, /) -> bytes:
        """Up to `n` bytes (at least one, unless the stream has ended); all with n < 0."""
        if n >= 0:
            return bytes(self.view(n))
        parts = []
        while part := self.view(sys.maxsize):
            parts.append(bytes(part))
        return b"".join(parts)

    def close(self) -> None:
        """Stop reading ahead. A reader thread stuck in a slow read is left to finish it
        (it is a daemon, and gives up at its next step)."""
        self._stop.set()
        self._thread.join(timeout=JOIN_TIMEOUT)
        if not self._thread.is_alive():  # no read into them can still be under way
            self._held, self._view = None, memoryview(b"")
            _give(self._pool)
        self._pool = []

    @property
    def ended(self) -> bool:
        """Whether the reader thread is gone (after close(), unless a read held it)."""
        return not self._thread.is_alive()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
