"""The temp files of `bootenv conflicts resolve`, and their removal when a kill left one.

A resolution that writes a file's bytes (`--file F`, `--keep merged`) writes them to a
temp file beside it, `.bootenv~resolve.<pid>`, and renames that over it; a resolve killed
in between (kill -9, a power cut) leaves the temp, the new bytes with the file's mode.
Each resolve holds the lock of the root's conflict records (an flock, which the kernel
drops when its holder dies) from before it makes a temp until after the rename, and the
next one, under it, removes the temps killed ones left: a regular file of that name in
the directory of any record's path, reached from the root without following a symlink,
and nothing else. Under the lock no live resolve has one, so none is taken from a run
still writing it. Not a check of the pid in the name: a resolve in another pid namespace
(a container, or the ramdisk, on the same root) would seem dead, and after a reboot a
killed run's pid is often a live process's, whose temp would then stay for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from bootenv.atfd import TMP_PREFIX, dir_under
from bootenv.log import printable
from bootenv.paxread import ArchiveError

log = logging.getLogger(__name__)

PREFIX = f"{TMP_PREFIX}resolve."
_KILLED = re.compile(re.escape(PREFIX) + r"[0-9]+")
LOCK = ".resolve.lock"  # in the records' directory


def temp_name() -> str:
    """This run's temp name, in the directory of the file it replaces."""
    return f"{PREFIX}{os.getpid()}"


@contextlib.contextmanager
def resolving(records: Path) -> Iterator[None]:
    """Hold the lock of the conflict records in `records`: one resolve at a time (one
    takes a moment, so the next waits for it)."""
    fd = os.open(records / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_killed(root: Path, parents: Iterable[str]) -> None:
    """Remove the temps killed resolves left in `parents` (paths from `root`, the
    directories of the records' paths); the caller holds the lock."""
    removed: list[str] = []
    for parent in sorted(set(parents)):
        try:
            with dir_under(root, parent) as dfd:
                names = [] if dfd is None else _remove_in(dfd)
        except ArchiveError:  # a symlink or not a directory on the way: no resolve wrote there
            continue
        except OSError as exc:
            log.warning("/%s: the temps of killed resolves not removed: %s", printable(parent), exc.strerror)
            continue
        removed += [printable(f"/{parent}/{n}" if parent else f"/{n}") for n in names]
    if removed:
        log.info("removed %d temp files killed resolves left: %s", len(removed), ", ".join(removed[:5]))


def _remove_in(dfd: int) -> list[str]:
    """The names of the killed resolves' temps removed from the directory `dfd`; synced
    once if any went, so a power cut does not bring them back."""
    removed = []
    for name in os.listdir(dfd):
        if _KILLED.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(name, dir_fd=dfd).st_mode):
                    os.unlink(name, dir_fd=dfd)
                    removed.append(name)
    if removed:
        os.fsync(dfd)
    return removed
