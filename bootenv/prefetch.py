"""Read ahead of a stream on a thread: a stream's decompression overlaps its file writes.

`zstd -dc | tar -x` runs two processes, so decompressing and writing files overlap. A
layout stream is one process; this gives it the same pipeline. Fetching, hashing and
zstd decompression (all of which release the GIL) run on a reader thread that keeps up
to `depth` blocks ready, while the caller parses the archive and makes the files.
An error on the reader thread is raised to the caller at the read that would have hit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from types import TracebackType
from typing import Protocol

BLOCK = 1 << 20
# Blocks kept ready. Four hold a zstd decompressor's lead over the parser (4 MiB is about
# 4 ms of decompression); eight gained nothing in interleaved runs and let the peak RSS
# wander with the run's length (layout of 1 GB vs 4 GB: 33.7 vs 40.0 MiB with eight,
# 34.2 vs 36.1 with four).
DEPTH = 4
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def steady_memory() -> None:
    """Keep large buffers (the 1 MiB blocks) in mmap'ed memory that goes back to the
    system when freed. glibc otherwise raises its mmap threshold after the first such
    free and serves later blocks from the heap, whose peak then wanders from run to run
    (measured: layout's peak RSS 48-56 MiB by chance; with this, 48 MiB for 1 and 4 GB)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class Prefetch:
    def __init__(self, src: Readable, *, block: int = BLOCK, depth: int = DEPTH) -> None:
        self._src = src
        self._block = block
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf = b""
        self._done = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._src.read(self._block)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, who raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> bytes:
        """Up to `n` bytes (at least one, unless the stream has ended); all with n < 0."""
        if n < 0:
            parts = []
            while part := self.read(self._block):
                parts.append(part)
            return b"".join(parts)
        if not self._buf and not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
            self._buf = item
        if n >= len(self._buf):
            out, self._buf = self._buf, b""
            return out
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        """Stop reading ahead. A reader thread stuck in a slow read is left to finish it
        (it is a daemon, and gives up at its next step)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
