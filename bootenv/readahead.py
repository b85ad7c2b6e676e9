"""Warm the page cache for files another process is about to read, one by one.

`mke2fs -d` reads the OS sub-image's files one at a time and waits on each read from a
cold disk. A thread that asks the kernel to read them ahead (posix_fadvise WILLNEED,
which queues the reads and returns) keeps the disk busy in the meantime, so mke2fs
mostly finds its data in memory. Measured on the LAMP gold: mke2fs -d of the whole
tree took 7.4 s from a cold cache and 4.7 s from a warm one.

The thread stops at a byte budget (it must not push out what it warmed before it is
read), and when the context ends. A file it cannot open (one a live machine removed
since the scan, left out of the image) is skipped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def plan(files: Sequence[tuple[str, int]], budget: int) -> list[str]:
    """The files (in the given order) whose sizes fit in `budget` bytes (pure)."""
    out, used = [], 0
    for path, size in files:
        if used + size > budget:
            break
        out.append(path)
        used += size
    return out


class Readahead:
    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self._root = str(root)
        self._paths = paths
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readahead", daemon=True)

    def __enter__(self) -> Readahead:
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        for path in self._paths:
            if self._stop.is_set():
                return
            try:
                fd = os.open(self._root + path, _FLAGS)
            except OSError as exc:
                log.debug("readahead skips %s: %s", path, exc.strerror)
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only
            finally:
                os.close(fd)
