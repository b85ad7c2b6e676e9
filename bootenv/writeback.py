"""Start writing a file's dirty pages to disk now, without waiting for them.

sync_file_range(SYNC_FILE_RANGE_WRITE) queues the writeback and returns, so the disk
works while the caller goes on; the fsync or syncfs that later makes the data durable
then has little left to wait for (dpkg does the same for each file it unpacks). It is
advice about timing only: it never replaces the fsync/syncfs.
"""

from __future__ import annotations

import ctypes
import functools

_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Queue the writeback of `nbytes` at `offset` (0: to the end of the file)."""
    _sync_file_range()(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
