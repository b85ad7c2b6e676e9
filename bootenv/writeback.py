"""Start writing to the disk now, so the final fsync or syncfs has little left to wait for.

sync_file_range(SYNC_FILE_RANGE_WRITE) queues a file's writeback and returns, so the disk
works while the caller goes on (dpkg does the same for each file it unpacks). `Flusher`
syncs a whole filesystem now and then on a thread of its own, while files are being
made. Both are advice about timing only: they never replace the final fsync/syncfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
FLUSH_INTERVAL = 0.1  # seconds between a Flusher's syncs


@functools.cache
def _sync_file_range() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Queue the writeback of `nbytes` at `offset` (0: to the end of the file)."""
    _sync_file_range()(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _syncfs() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).syncfs
    fn.argtypes = (ctypes.c_int,)
    return fn


def _fdatasync(fd: int) -> int:
    try:
        os.fdatasync(fd)
    except OSError:
        return -1
    return 0


class Flusher:
    """Sync `path` every `interval` seconds (FLUSH_INTERVAL), until closed: its whole
    filesystem (a directory), or the file or device itself.

    Queued writeback is not the end of a flush: a sync also commits the filesystem's
    journal and has the disk flush its cache. Where the disk is a file of the host's (a
    VM's disk, or the benchmarks' loop device), that flush makes the host commit every
    block allocated since the last one, and at the end of a layout of mysql it took
    0.45 s with the disk otherwise idle (measured: sectors written per 50 ms). Synced as
    it goes, the final sync finds little left. The thread spends its time in the
    syscall, without the GIL.

    The flusher syncs through a file description of its own, opened here: a write error
    it is told of is still reported to the owner's final fsync or syncfs on theirs (the
    kernel reports such an error once per description).
    """

    def __init__(self, path: Path | str, interval: float | None = None) -> None:
        self._interval = FLUSH_INTERVAL if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # advice only: the final sync still comes
            log.debug("not syncing %s as it is written: %s", path, exc)
            return
        whole = stat.S_ISDIR(os.fstat(self._fd).st_mode)
        self._sync: Callable[[int], int] = _syncfs() if whole else _fdatasync
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sync(self._fd)  # advice: a failure is the final sync's to report

    def close(self) -> None:
        if self.running and self._thread is not None:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __enter__(self) -> Flusher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
