"""Entries reached and made through directory fds (the *at system calls), never through a symlink.

Every path is reached from the root through directory file descriptors opened with
O_NOFOLLOW, one component at a time, so no symlink (planted by an archive or already
in the tree) can redirect a write. An entry is made under a temp name (TMP_PREFIX) in
its final directory and renamed into place with RENAME_NOREPLACE: a kill -9 leaves
either nothing or the finished entry, and a path someone else already took is never
overwritten. A process that lays out (a stream) grows its table of fds once, up front
(reserve_fd_table).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from bootenv.paxread import ArchiveError, Member, PaxReader

T = TypeVar("T")

TMP_PREFIX = ".bootenv~"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# fds: a TreeWriter's MAX_OPEN_DIRS directories (extract.py), and a stream's files and pieces
FD_TABLE = 512
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): FileExistsError if `dst` is taken."""
    rc = _libc.renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS) and not stat.S_ISDIR(
            os.lstat(src, dir_fd=src_fd).st_mode
        ):  # a filesystem without RENAME_NOREPLACE: link() refuses to replace too
            os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            os.unlink(src, dir_fd=src_fd)
            return
        raise OSError(err, os.strerror(err), dst)


def open_child(pfd: int, name: str, rel: str, *, create: bool) -> int:
    """An fd of directory `name` in directory `pfd` (`rel`: its path from the root, for
    the error), not followed if it is a symlink; made (0755) if missing and `create`."""
    try:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=pfd)
            return os.open(name, DIR_FLAGS, dir_fd=pfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ArchiveError(f"refused: /{rel} is a symlink or not a directory") from exc
        raise


def open_dir(root_fd: int, rel: str, *, create: bool = False) -> int:
    """A new fd of directory `rel` (relative to the root `root_fd`), every component of
    it opened as open_child does: no symlink on the way is followed. The caller closes it."""
    fd = os.dup(root_fd)
    done = ""
    for name in rel.split("/") if rel else ():
        done = f"{done}/{name}" if done else name
        try:
            child = open_child(fd, name, done, create=create)
        finally:
            os.close(fd)
        fd = child
    return fd


@contextlib.contextmanager
def dir_under(root: Path, rel: str | Path, *, create: bool = False) -> Iterator[int | None]:
    """An fd of ROOT/`rel`, every directory on the way opened as open_dir does (a symlink
    one planted would lead outside the root): None if it is missing and not `create`."""
    root_fd = os.open(root, DIR_FLAGS)
    try:
        fd: int | None = open_dir(root_fd, str(rel), create=create)
    except FileNotFoundError:
        fd = None
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def fresh(pfd: int, tmp: str, make: Callable[[], T]) -> T:
    """Create a temp entry with `make`; if a killed run left one under that name, remove
    it and create again (one syscall in the common case, not an unlink before each)."""
    try:
        return make()
    except FileExistsError:
        try:
            os.unlink(tmp, dir_fd=pfd)
        except IsADirectoryError:
            os.rmdir(tmp, dir_fd=pfd)  # a temp directory is renamed before anything goes in it
        return make()


def renamed(pfd: int, tmp: str, base: str) -> bool:
    try:
        rename_noreplace(pfd, tmp, pfd, base)
    except FileExistsError:
        return False
    return True


def exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def write_sparse(fd: int, reader: PaxReader, m: Member) -> None:
    """Write sparse member `m`'s data ranges at their offsets in new file `fd`, the
    holes left unwritten, and make them durable before its caller renames it into place.

    A file written in one pass reaches the disk with its size only as its data does
    (ext4, XFS): a power cut leaves it under its name short, a prefix of itself, and
    the next layout lays it out whole (sharedpaths._cut_short). This one gets its whole
    size first (ftruncate, journaled at once), so a power cut could leave it its full
    size with some or all of its data holes: zeros no later run can tell from the
    file's own, kept as a conflict with the archive's version while a database starts
    on it. Synced here, the file is whole under its name or not there at all. Sparse
    members are few and large (a database's files): measured, see PERFORMANCE.md."""
    assert m.sparse is not None
    os.ftruncate(fd, m.realsize)
    chunks = reader.chunks()
    pending: bytes | memoryview = b""
    for offset, size in m.sparse:
        pos, length = offset, size
        while length > 0:
            if not pending:
                pending = next(chunks, b"")
                if not pending:
                    raise ArchiveError(f"sparse member /{m.name} is shorter than its map")
            piece, pending = pending[:length], pending[length:]
            os.pwrite(fd, piece, pos)
            pos += len(piece)
            length -= len(piece)
    for _ in chunks:
        pass
    os.fdatasync(fd)


def safe_to_create(mode: int) -> bool:
    """Whether a file may be created with its final `mode` rather than 0600, before it
    has its owner: root's, until its chown, and left so if a kill -9 comes first. Then
    root's group holds the group bits and the final owner and group are "others": safe
    only if the group and others get the same and others no more than the owner. No
    special bits (chown clears them). 0644, 0755, 0444 and 0600 qualify; 0640 does not."""
    group, other = (mode >> 3) & 7, mode & 7
    return not mode & 0o7000 and group == other and not other & ~(mode >> 6)


def reserve_fd_table() -> None:
    """Grow this process's table of file descriptors to FD_TABLE now, while it has one
    thread. The kernel doubles the table when a new fd does not fit, and in a process
    with threads it then waits for an RCU grace period first (10-30 ms here, measured);
    a forked stream starts with 64 and grew it twice while laying out LAMP. A table
    never shrinks, so one fd taken at the top and given back saves those waits. Best
    effort: it only saves time."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError):  # no fd to spare, or a limit too low to matter
        fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The lowest free fd from there: one the process holds is never touched.
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, min(FD_TABLE, soft) - 1))
        finally:
            os.close(fd)
