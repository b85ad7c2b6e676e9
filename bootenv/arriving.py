"""Read a piece of a component that is still arriving: only what is in, waiting for more.

A large piece (a chunk that holds one big file, typically) pins each block of it in the
manifest. The fetcher (fetchahead.py) appends such a piece to its file one verified
block at a time, so a stream can lay out its first files while the rest is still on the
wire, and every byte it reads has already matched its sha256. The fetcher marks the
file (mode 0) when it gives up on the piece; the stream then fails it, as it does when
the process that fetches it is gone.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO

from bootenv.errors import FatalError

_FIRST_WAIT = 0.001
_MAX_WAIT = 0.05
# The fetcher touches the file (its mtime) at every read from the network. With no sign
# of life for this long (longer than a fetch's retries and backoff can stay silent,
# httpreader.RetryPolicy), give up: the fetcher failed and could not mark the file.
GIVE_UP = 600.0


class Arriving:
    """A file-like reader of the first `size` bytes of `f`, which grows as they arrive."""

    def __init__(self, f: BinaryIO, size: int, name: str, path: str) -> None:
        self._fd = f.fileno()
        self._size = size
        self._name = name
        # The fetcher hands the piece over as /proc/<its pid>/fd/<n>.
        parts = path.split("/")
        self._fetcher = int(parts[2]) if path.startswith("/proc/") and parts[2].isdigit() else 0
        self.pos = 0
        self._stopped = False

    def stop(self) -> None:
        """The reader is done with it (a stream that failed): a read waiting for more
        gives up now, so the reading thread ends before the file is closed."""
        self._stopped = True

    def read(self, n: int = -1, /) -> bytes:
        left = self._size - self.pos
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        wait, alive, since = _FIRST_WAIT, 0, time.monotonic()
        while not (data := os.pread(self._fd, n, self.pos)):
            st = os.fstat(self._fd)
            if st.st_mtime_ns != alive:  # the fetcher touches the file at every read
                alive, since = st.st_mtime_ns, time.monotonic()
            try:
                self._check(st.st_mode, time.monotonic() - since)
            except FatalError:
                # The fetcher appends its last good block, then marks its failure: both
                # may have come since the read above, and that block is the reader's.
                if data := os.pread(self._fd, n, self.pos):
                    break
                raise
            time.sleep(wait)
            wait = min(2 * wait, _MAX_WAIT)
        self.pos += len(data)
        return data

    def _check(self, mode: int, silent: float) -> None:
        if self._stopped:
            raise FatalError(f"{self._name}: reading stopped")
        if mode & 0o777 == 0:
            raise FatalError(f"{self._name}: its download failed")
        if self._fetcher and self._fetcher != os.getpid():
            try:
                os.kill(self._fetcher, 0)
            except ProcessLookupError:
                raise FatalError(f"{self._name}: the process fetching it is gone") from None
        if silent > GIVE_UP:
            raise FatalError(f"{self._name}: no sign of its download for {GIVE_UP:.0f} s")
