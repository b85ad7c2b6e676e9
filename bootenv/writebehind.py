"""Write behind on a thread: the disk's wait overlaps the caller's hashing.

`curl | zstd -dc | dd` runs three processes, so the network, decompression and the disk
all work at once. write-os is one process: a read-ahead thread fetches and decompresses
(prefetch.py), the caller hashes each range, and this thread writes. A direct write
blocks until the disk has the data; on the caller's thread that wait held up the next
range's hash.

The caller takes a free buffer, fills it, and submits it with the writes to make from
it; the thread hands the buffer back once they are done. An error on the thread is
raised to the caller at its next `buffer()` or at `finish()`, and everything submitted
after it is dropped, unwritten.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

Write = Callable[[memoryview, int], None]
Job = tuple[memoryview, Sequence[tuple[int, int, int]]]  # buffer, (start, length, offset) in it


class WriteBehind:
    def __init__(self, write: Write, buffers: Sequence[memoryview]) -> None:
        self._write = write
        self._free: queue.Queue[memoryview] = queue.Queue()
        for buf in buffers:
            self._free.put(buf)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buf, writes = job
            if self._error is None:
                try:
                    for start, length, offset in writes:
                        self._write(buf[start : start + length], offset)
                except BaseException as exc:  # handed to the caller, who raises it
                    self._error = exc
            self._free.put(buf)  # every buffer comes back, so buffer() never waits forever

    def buffer(self) -> memoryview:
        """A buffer no write uses any more (waits for one)."""
        buf = self._free.get()
        self._raise()
        return buf

    def submit(self, buf: memoryview, writes: Sequence[tuple[int, int, int]]) -> None:
        """Write `buf[start:start + length]` at `offset` for each entry, in order."""
        self._jobs.put((buf, writes))

    def finish(self) -> None:
        """Wait until everything submitted is written; raise the thread's error if any."""
        self._stop()
        self._raise()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # What was submitted is written even when the caller failed (at most the buffers'
        # worth), so the target is left as one thread would have left it; and the caller
        # may wipe the target next, so no write may still be running then.
        self._stop()
