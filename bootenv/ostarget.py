"""Where write-os's bytes land: pwrite() to an fd, with O_DIRECT where it is taken.

The first write wipes the image's header region (the first MiB: boot sector, partition
table, ext4 superblock) and, on a block device, the last MiB past the image, then syncs,
so the old filesystem is gone from the disk before new data lands; `wipe()` makes the
target unmountable again after a failure. A target that refuses O_DIRECT (when it is
set, or at a write) gets buffered writes, each started to the disk at once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from bootenv.blockdev import device_size
from bootenv.errors import FatalError
from bootenv.writeback import start_writeback

log = logging.getLogger(__name__)

HEADER = 1 << 20  # held back until everything verified
ALIGN = 4096  # O_DIRECT offset/length alignment (covers 512- and 4096-byte sectors)


class Target:
    """pwrite()s to an fd, with O_DIRECT for aligned writes when asked to.

    The first write wipes the header region (and, on a block device, the last MiB past
    the image, where GPT backups and md/LVM metadata live); `wipe()` makes the target
    unmountable.
    """

    def __init__(self, fd: int, *, direct: bool, is_block: bool, image_size: int) -> None:
        self.fd = fd
        self.direct = direct
        self.is_block = is_block
        self.image_size = image_size
        self.touched = False
        self.written = 0
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._direct_on = False

    def _set_direct(self, on: bool) -> None:
        if on != self._direct_on:
            flags = self._flags | os.O_DIRECT if on else self._flags
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
            except OSError as exc:
                if on:  # a filesystem without O_DIRECT (tmpfs before Linux 6.6, some FUSE)
                    raise _DirectRefusedError from exc
                raise
            self._direct_on = on

    def write(self, buf: memoryview, offset: int) -> None:
        if not self.touched:
            self.touched = True
            self.wipe(sync=False)
            if self.is_block:
                self._wipe_tail()
            # The old superblock must be gone from the disk itself before new data lands,
            # or a power cut could leave the old filesystem over a half-new one.
            self.sync()
        aligned = len(buf) - len(buf) % ALIGN if self.direct and offset % ALIGN == 0 else 0
        if aligned:
            try:
                self._set_direct(True)
                self._pwrite_all(buf[:aligned], offset)
            except _DirectRefusedError:
                # Refused when set, or taken then and refused when written (FUSE, a
                # device whose logical block is larger than ALIGN): from now on, and for
                # this buffer, the writes go through the page cache.
                log.info("the target refuses direct I/O: writing through the page cache")
                self.direct = False
                aligned = 0
        if aligned < len(buf):
            self._set_direct(False)
            self._pwrite_all(buf[aligned:], offset + aligned)
            # Buffered (an unaligned piece, or a file system without O_DIRECT): have the
            # disk take it now, not all at the final fsync (measured on LAMP, when all
            # of a regular file went this way: that fsync alone took 1.2 s of 4.2).
            start_writeback(self.fd, offset + aligned, len(buf) - aligned)
        self.written += len(buf)

    def _pwrite_all(self, buf: memoryview, offset: int) -> None:
        while buf:
            try:
                n = os.pwrite(self.fd, buf, offset)
            except OSError as exc:
                if self._direct_on and exc.errno == errno.EINVAL:
                    raise _DirectRefusedError from exc
                raise FatalError(f"write at byte {offset} failed: {exc.strerror}") from exc
            buf = buf[n:]
            offset += n

    def wipe(self, *, sync: bool = True) -> None:
        """Zero the first MiB (boot sector, partition table, ext4 superblock).

        A regular file with nothing there is left sparse: there is nothing to wipe.
        """
        self._set_direct(False)
        if self.is_block or _has_data(self.fd, HEADER):
            size = device_size(self.fd)
            zeros = memoryview(bytes(min(HEADER, size)))
            self._pwrite_all(zeros, 0)
        if sync:
            self.sync()

    def _wipe_tail(self) -> None:
        size = device_size(self.fd)
        start = max(size - HEADER, self.image_size)
        if start < size:
            self._pwrite_all(memoryview(bytes(size - start)), start)

    def sync(self) -> None:
        self._set_direct(False)
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise FatalError(f"flushing the written image failed: {exc.strerror}") from exc


class _DirectRefusedError(Exception):
    """The target refused O_DIRECT: when it was set, or at a write (EINVAL)."""


def _has_data(fd: int, end: int) -> bool:
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) < end
    except OSError:  # ENXIO: no data at all
        return False
