"""Shared directories: whose owner, group and mode a directory several components ship holds.

A directory is structure: several sub-images ship the same one, and a layout never
replaces one (extract.py). What it ends with must not depend on which stream reached it
first, so:

- a directory in place before bootenv made it (the OS image's, the admin's) keeps its
  owner, group, mode and xattrs; a component whose own differ gets a warning (its
  owner and mode, its xattrs: one warning each). Whether such a directory has any
  xattrs is asked once (xattr_names), which also tells the layout whether it has a
  default ACL, the question it asks of each directory it puts files in;
- a directory bootenv makes holds those of the first component, by name, that ships it.
  The component that makes it records itself and the owner, group, mode and xattrs (a
  digest of them) it gave it in ROOT/var/lib/bootenv/layout/dirmeta/<hash of the path>.
  One that sorts before it and finds the directory later gives it its own owner, group,
  mode and xattrs and records itself instead, unless any of them are no longer the
  recorded ones (the admin changed them since, a chmod or a default ACL: they all stay,
  and the component gets a warning). One that sorts after it gets a warning if its own
  differ from the maker's.

So a layout of alpha, beta and gamma gives the same directories with one stream or four,
and so do three layouts of one component each, in any order. The mtime is not part of
the rule: it is the maker's, and a file another component adds later changes it anyway.

A record is a symlink whose target is the record (`alpha 750 0 4 -`: the last field is
the digest of the xattrs, `-` for none, the labels a security policy gives left out as
xattrs_of does): made, replaced (renamed over) and read in one system call each, never
missing while it is replaced. One without the digest (an earlier build's) reads as no
record: its directory keeps what it has, as one in place before does. A record is
written, and a directory is made or taken over, under an flock of the records'
directory; the maker writes the record before the rename that puts the directory in
place, so whoever finds a directory bootenv made finds its record. A directory found
with no record (the common case: the OS's) needs no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from bootenv.merge import STATE, path_key
from bootenv.xattrs import LABELS, xattrs_of

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


def digest(xattrs: dict[str, bytes]) -> str:
    """A record's field for a directory's xattrs: `-` for none, else a digest of them."""
    if not xattrs:
        return "-"
    h = hashlib.sha256()
    for key, value in sorted(xattrs.items()):
        key_bytes = os.fsencode(key)
        h.update(len(key_bytes).to_bytes(4, "big") + key_bytes + len(value).to_bytes(4, "big") + value)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Found:
    """What directory `name` in `pfd` has now: its owner, group, mode and xattrs."""

    owner: Owner
    xattrs: dict[str, bytes]

    @classmethod
    def at(cls, pfd: int, name: str, *, xattrs: bool = True) -> Found:
        """`xattrs`: False where the directory has none (made for a member with none,
        what it inherited dropped): not asked, as a layout asks once per directory."""
        return cls(Owner.of(os.lstat(name, dir_fd=pfd)), xattrs_of(pfd, name) if xattrs else {})

    @property
    def digest(self) -> str:
        return digest(self.xattrs)


@dataclass(frozen=True)
class Record:
    maker: str  # the component whose owner, group, mode and xattrs the directory was given
    owner: Owner
    xattrs: str  # their digest


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
        if len(fields) != 5 or not all(f.isdigit() for f in fields[1:4]):
            return None
        return Record(fields[0], Owner(int(fields[1], 8), int(fields[2]), int(fields[3])), fields[4])

    def write(self, relpath: str, component: str, found: Found) -> None:
        """Record `component` and what it gave `relpath` (`found` there after); called
        under `locked`."""
        key = path_key(relpath)
        owner = found.owner
        text = f"{component} {owner.mode:o} {owner.uid} {owner.gid} {found.digest}"
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


def takes_over(component: str, record: Record | None, found: Found) -> bool:
    """Whether `component` gives a directory it found in place its own metadata: one
    bootenv made for a component that sorts after it, unchanged since (owner, group,
    mode and xattrs)."""
    return (
        record is not None
        and component < record.maker
        and found.owner == record.owner
        and found.digest == record.xattrs
    )


def xattr_names(pfd: int, name: str) -> set[str] | None:
    """The names of directory `name`'s xattrs, labels aside, in one call (the common
    case: none, and nothing more to read); None if they cannot be listed."""
    try:
        return set(os.listxattr(f"/proc/self/fd/{pfd}/{name}", follow_symlinks=False)) - LABELS
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return set()
        return None


def comparable(xattrs: dict[str, bytes], *, privileged: bool) -> dict[str, bytes]:
    """Those of `xattrs` a layout compares: one that is not root can set neither
    trusted.* nor security.* ones, so it leaves them out, as it leaves out the owner."""
    if privileged:
        return xattrs
    return {k: v for k, v in xattrs.items() if not k.startswith(("trusted.", "security."))}


def xattrs_differ(relpath: str, whose: str, have: dict[str, bytes], mine: dict[str, bytes]) -> str | None:
    """The warning for a component whose xattrs (`mine`) directory `relpath` in place
    does not have: it keeps `whose` (`have`), as it keeps its owner and mode."""
    if have == mine:
        return None
    keys, own = ", ".join(sorted(have)) or "none", ", ".join(sorted(mine)) or "none"
    if keys == own:
        return f"directory /{relpath} keeps {whose} xattrs' values ({keys}), not this component's"
    return f"directory /{relpath} keeps {whose} xattrs ({keys}), not this component's ({own})"


def xattrs_kept(relpath: str, record: Record | None, found: Found | None) -> str | None:
    """The warning for a component that finds directory `relpath`, which bootenv made,
    with xattrs other than those recorded (an admin's default ACL): they stay."""
    if record is None or found is None or found.digest == record.xattrs:
        return None
    keys = ", ".join(sorted(found.xattrs)) or "none"
    return f"directory /{relpath} keeps its xattrs ({keys}), changed since it was made, not this component's"
