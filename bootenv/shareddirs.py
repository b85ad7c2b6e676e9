"""Shared directories: whose owner, group and mode a directory several components ship holds.

A directory is structure: several sub-images ship the same one, and a layout never
replaces one (extract.py). What it ends with must not depend on which stream reached it
first, so:

- a directory in place before bootenv made it (the OS image's, the admin's) keeps its
  owner, group, mode and xattrs; a component whose own differ gets a warning;
- a directory bootenv makes holds those of the first component, by name, that ships it.
  The component that makes it records itself and the owner, group and mode it gave it
  in ROOT/var/lib/bootenv/layout/dirmeta/<hash of the path>. One that sorts before it and
  finds the directory later gives it its own owner, group, mode and xattrs and records
  itself instead, unless the owner, group or mode are no longer the recorded ones (the
  admin changed them since: they stay, and the component gets a warning).

So a layout of alpha, beta and gamma gives the same directories with one stream or four,
and so do three layouts of one component each, in any order. The mtime is not part of
the rule: it is the maker's, and a file another component adds later changes it anyway.

A record is a symlink whose target is the record (`alpha 750 0 4`): made, replaced
(renamed over) and read in one system call each, never missing while it is replaced. It
is written, and a directory is made or taken over, under an flock of the records'
directory; the maker writes the record before the rename that puts the directory in
place, so whoever finds a directory bootenv made finds its record. A directory found
with no record (the common case: the OS's) needs no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from bootenv.merge import STATE, path_key

RECORDS = STATE / "dirmeta"


@dataclass(frozen=True)
class Owner:
    """A directory's owner, group and mode."""

    mode: int
    uid: int
    gid: int

    @classmethod
    def of(cls, st: os.stat_result) -> Owner:
        return cls(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)

    def __str__(self) -> str:
        return f"{self.mode:04o} {self.uid}:{self.gid}"


@dataclass(frozen=True)
class Record:
    maker: str  # the component whose owner, group and mode the directory was given
    owner: Owner


class Records:
    """The records' directory (`fd`, held open by its tree writer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, relpath: str) -> Record | None:
        """The record of directory `relpath`; None if there is none (or it is not one)."""
        try:
            fields = os.readlink(path_key(relpath), dir_fd=self.fd).split()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINVAL):  # none, or not a symlink
                return None
            raise
        if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]):
            return None
        return Record(fields[0], Owner(int(fields[1], 8), int(fields[2]), int(fields[3])))

    def write(self, relpath: str, component: str, owner: Owner) -> None:
        """Record `component` and `owner` for `relpath`; called under `locked`."""
        key = path_key(relpath)
        text = f"{component} {owner.mode:o} {owner.uid} {owner.gid}"
        try:
            os.symlink(text, key, dir_fd=self.fd)
        except FileExistsError:  # one to replace (a killed run's, or the last maker's)
            tmp = f".{key}.tmp"  # one writer at a time: the lock is held
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self.fd)
            os.symlink(text, tmp, dir_fd=self.fd)
            os.rename(tmp, key, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def takes_over(component: str, record: Record | None, current: Owner) -> bool:
    """Whether `component` gives a directory it found in place its own metadata: one
    bootenv made for a component that sorts after it, unchanged since."""
    return record is not None and component < record.maker and current == record.owner
