"""Scan a root tree into a flat, sorted list of entries (the only I/O of planning).

The tree is read through directory file descriptors (openat, fstatat, readlinkat), never
through ROOT/path: any path the gold can hold is read, however long it is once ROOT is
put in front of it (PATH_MAX is the kernel's limit on one path argument, not on the
tree), and no symlink is ever followed (a gold's absolute links name its own paths,
not the host's).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from bootenv.cmdline import shown
from bootenv.errors import FatalError

log = logging.getLogger(__name__)

# What reading a path that a live machine removed meanwhile raises (ENOTDIR: a parent
# directory was replaced by a file).
GONE = (errno.ENOENT, errno.ENOTDIR)

NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    SOCKET = "socket"
    CHAR = "char"
    BLOCK = "block"


@dataclass(frozen=True)
class Entry:
    path: str  # absolute inside the tree: "/etc/hostname"; "/" is the root itself
    kind: Kind
    size: int = 0
    target: str | None = None  # symlink target, as stored
    mountpoint: bool = False  # another filesystem is mounted here; not descended
    # A mount point's: the top of the filesystem mounted there (not captured), for the
    # warning that names what is left out.
    mounted: tuple[Entry, ...] = ()


def _kind(mode: int) -> Kind:
    for test, kind in (
        (stat.S_ISDIR, Kind.DIR),
        (stat.S_ISLNK, Kind.SYMLINK),
        (stat.S_ISREG, Kind.FILE),
        (stat.S_ISFIFO, Kind.FIFO),
        (stat.S_ISSOCK, Kind.SOCKET),
        (stat.S_ISCHR, Kind.CHAR),
        (stat.S_ISBLK, Kind.BLOCK),
    ):
        if test(mode):
            return kind
    raise ValueError(f"unknown file type {mode:o}")


def brief(path: str, keep: int = 60) -> str:
    """`path` for a one-line message: escaped (shown), and a long one cut in the middle,
    with its length: a 4 KB path would be the whole line."""
    size = len(os.fsencode(path))
    if size <= 2 * keep + 20:
        return shown(path)
    return f"{shown(path[:keep])}...{shown(path[-keep:])} ({size} bytes)"


def scan(root: Path) -> list[Entry]:
    """Every entry below `root` on the same filesystem, parents before children, each
    directory's children by name. On a live machine, an entry removed while its
    directory is read is left out."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # ROOT: the admin's path
    try:
        entries = [Entry("/", Kind.DIR)]
        _walk(root, top, os.fstat(top).st_dev, entries)
        return entries
    finally:
        os.close(top)


# One open directory per level of the walk: its fd, its path in the tree, and its
# children not yet looked at, last name first (popped in order).
_Level = tuple[int, str, list[os.DirEntry[str]]]


def _walk(root: Path, top: int, root_dev: int, out: list[Entry]) -> None:
    """Depth first, without recursion: a tree may be thousands of directories deep."""
    stack: list[_Level] = [(top, "", _children(root, top, ""))]
    try:
        while stack:
            fd, rel, children = stack[-1]
            if not children:
                stack.pop()
                if fd != top:
                    os.close(fd)
                continue
            child = children.pop()
            path = f"{rel}/{child.name}"
            entry = _entry(root, fd, child, path, root_dev)
            if entry is None:
                continue
            out.append(entry)
            if entry.kind is Kind.DIR and not entry.mountpoint:
                sub = _open_dir(root, fd, child.name, path, root_dev)
                if sub is not None:
                    stack.append((sub, path, []))  # pushed first: closed on any failure
                    stack[-1][2].extend(_children(root, sub, path))
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)


def _children(root: Path, fd: int, rel: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(fd) as it:
            return sorted(it, key=lambda e: e.name, reverse=True)
    except OSError as exc:
        raise _unreadable(root, rel, exc) from exc


def _entry(root: Path, fd: int, child: os.DirEntry[str], path: str, root_dev: int) -> Entry | None:
    """What `child` is (None: a live machine removed it since its directory was read)."""
    try:
        st = child.stat(follow_symlinks=False)  # fstatat(fd, name): the scandir was of fd
        kind = _kind(st.st_mode)
        target = os.readlink(child.name, dir_fd=fd) if kind is Kind.SYMLINK else None
    except OSError as exc:
        if exc.errno in GONE:
            return None
        raise _unreadable(root, path, exc) from exc
    if kind is Kind.DIR:
        if st.st_dev != root_dev:
            return Entry(path, kind, mountpoint=True, mounted=_mounted(fd, child.name, path))
        return Entry(path, kind)
    if kind is Kind.SYMLINK:
        return Entry(path, kind, target=target)
    return Entry(path, kind, size=st.st_size if kind is Kind.FILE else 0)


def _open_dir(root: Path, fd: int, name: str, path: str, root_dev: int) -> int | None:
    """The directory `name` of `fd`, not followed if a live machine made it a symlink
    since (None: gone, or no longer a directory of ROOT's filesystem)."""
    try:
        sub = os.open(name, NOFOLLOW_DIR, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (*GONE, errno.ELOOP):
            return None
        if exc.errno == errno.EMFILE:
            raise FatalError(
                f"{brief(f'{root}{path}')}: too deep to scan: one open directory per level "
                "is more than the open files allowed",
                hint="raise the limit (ulimit -n) and capture again",
            ) from exc
        raise _unreadable(root, path, exc) from exc
    if os.fstat(sub).st_dev != root_dev:  # mounted on since it was looked at
        os.close(sub)
        return None
    return sub


def _mounted(fd: int, name: str, path: str) -> tuple[Entry, ...]:
    """The top of the filesystem mounted on `name`: what the capture leaves out there.
    Best effort (it only names what is left out): nothing if it cannot be read."""
    try:
        sub = os.open(name, NOFOLLOW_DIR, dir_fd=fd)
    except OSError:
        return ()
    try:
        with os.scandir(sub) as it:
            children = sorted(it, key=lambda e: e.name)
        out = []
        for child in children:
            try:
                out.append(Entry(f"{path}/{child.name}", _kind(child.stat(follow_symlinks=False).st_mode)))
            except OSError:
                continue
        return tuple(out)
    except OSError:
        return ()
    finally:
        os.close(sub)


def _unreadable(root: Path, path: str, exc: OSError) -> FatalError:
    return FatalError(f"{brief(f'{root}{path}' if path else str(root))}: {exc.strerror}")


def exists_in(root: Path, path: str) -> bool:
    """Whether `path` (absolute in the tree, its parents with no symlink left: resolved
    inside the tree first) is in the tree, found without following any link: a parent
    that is a symlink makes it absent (a gold's absolute link would lead onto the host)."""
    parts = [p for p in path.split("/") if p]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                sub = os.open(part, NOFOLLOW_DIR, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = sub
        if parts:
            try:
                os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            except OSError:
                return False
        return True
    finally:
        os.close(fd)
