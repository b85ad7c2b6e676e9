"""Reading a small file whole, without trusting its size: a manifest, a signature, a
catalog, a key, a kernel command line.

`Path.read_bytes` reads whatever is there: /dev/zero forever, a FIFO until its writer
closes it, a 300 MB "manifest" into memory before its size is checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bootenv.errors import UserError


def read_capped(path: Path | str, limit: int, *, dir_fd: int | None = None) -> bytes:
    """At most `limit + 1` bytes of the regular file at `path`: more than `limit` says
    the file is larger, which the caller refuses in its own words. Anything but a regular
    file (a directory, a FIFO, a device) is a UserError naming it; a failure to open or
    read it is the OSError, as `open` raises it. With `dir_fd`, `path` is a name in that
    directory, and a symlink there is not followed (ELOOP)."""
    # O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused below).
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if dir_fd is not None else 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a regular file")
        parts = []
        left = limit + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 20))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_small(path: Path, limit: int, what: str) -> bytes:
    """The whole regular file at `path`, refused (a UserError naming `what` and the path)
    if it is larger than `limit` bytes or cannot be read."""
    try:
        data = read_capped(path, limit)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UserError as exc:  # not a regular file
        raise UserError(f"{what} {exc.message}") from exc
    if len(data) > limit:
        raise UserError(f"{what} {path} is larger than {_size(limit)}")
    return data


def _size(n: int) -> str:
    if n >= 1 << 20 and not n % (1 << 20):
        return f"{n >> 20} MiB"
    return f"{n >> 10} KiB" if n >= 1024 and not n % 1024 else f"{n} bytes"
