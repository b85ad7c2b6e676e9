"""Scan a root tree into a flat, sorted list of entries (the only I/O of planning)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

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


def scan(root: Path) -> list[Entry]:
    """Every entry below `root` on the same filesystem, parents before children. On a
    live machine, an entry removed while its directory is read is left out."""
    root_dev = os.lstat(root).st_dev
    entries = [Entry("/", Kind.DIR)]
    entries.extend(_scan_dir(str(root), "", root_dev))
    return entries


def _scan_dir(top: str, rel: str, root_dev: int) -> Iterator[Entry]:
    try:
        with os.scandir(top + rel or "/") as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        if rel and exc.errno in GONE:  # it vanished since its parent was read
            return
        raise
    for child in children:
        path = f"{rel}/{child.name}"
        try:
            st = child.stat(follow_symlinks=False)
            kind = _kind(st.st_mode)
            target = os.readlink(top + path) if kind is Kind.SYMLINK else ""
        except OSError as exc:
            if exc.errno in GONE:  # removed while the directory was read: a live machine
                continue
            raise
        if kind is Kind.DIR:
            other_fs = st.st_dev != root_dev
            yield Entry(path, kind, mountpoint=other_fs)
            if not other_fs:
                yield from _scan_dir(top, path, root_dev)
        elif kind is Kind.SYMLINK:
            yield Entry(path, kind, target=target)
        else:
            yield Entry(path, kind, size=st.st_size if kind is Kind.FILE else 0)


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
