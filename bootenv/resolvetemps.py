"""What a killed `bootenv conflicts resolve` leaves: its temp file, removed by the next
resolve, and its intent, which the next one with the same choice finishes.

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

A resolution is decided, then applied, then recorded: several steps (the file replaced,
the stored version removed, the record written), any of which a kill may come before.
So it is first written down, durably, as an intent beside the record (`<id>.intent`):
the choice, and what the path holds once it is applied (the sha256 of the bytes a merge
or the admin's file puts there; the incoming version's type, owner, mode and sha256).
A resolve of a conflict with an intent finishes it: it does again only the steps whose
outcome is not there yet (a merge is never appended twice), records it, and removes the
intent. One that asks for something else is refused, naming what was asked first; one
whose conflict was resolved another way since (a layout retired it after the run was
killed), or holds another incoming version (a layout found a newer one, which the
admin has not seen), fails, saying so, and its intent is dropped.

A layout writes records too, under the same lock (records_locked): a conflict's version
moved to the store and its record written (sharedpaths.py), a conflict it no longer finds
retired (conflicts.retire). Taken only when it writes one, which is rare, and held for
those few writes, so no layout takes a resolve's stored version or record from under
it, nor a resolve a layout's. The order of the locks: a layout holds the root's layout
lock (layout_root.alone, a lockf) and takes this one inside it, in its own process or a
stream's; a resolve takes this one alone, never the layout lock. Neither waits for
anything else while holding it, nor takes it twice, so a layout and a resolve cannot
wait for each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bootenv.atfd import TMP_PREFIX, dir_under
from bootenv.errors import UserError
from bootenv.log import printable
from bootenv.paxread import ArchiveError
from bootenv.writeback import fsync_dir, write_durably

log = logging.getLogger(__name__)

PREFIX = f"{TMP_PREFIX}resolve."
_KILLED = re.compile(re.escape(PREFIX) + r"[0-9]+")
LOCK = ".resolve.lock"  # in the records' directory
INTENT = ".intent"  # <id>.intent in the records' directory
CHOICES = ("existing", "incoming", "merged", "file")


@dataclass(frozen=True)
class Intent:
    """A resolution decided, not yet recorded: `keep` one of CHOICES, `file` the
    admin's (absolute) for `file`, `put` what the path holds once it is applied
    (nothing to check for `existing`), `at` when it was decided, `incoming` the
    record's incoming version it was decided for (None in an intent written before
    it was kept)."""

    keep: str
    file: str | None
    put: dict[str, Any]
    at: str
    incoming: dict[str, Any] | None = None

    def asked(self) -> str:
        return f"--file {self.file}" if self.keep == "file" else f"--keep {self.keep}"


def temp_name() -> str:
    """This run's temp name, in the directory of the file it replaces."""
    return f"{PREFIX}{os.getpid()}"


@contextlib.contextmanager
def records_locked(records: Path) -> Iterator[None]:
    """Hold the lock of the conflict records in `records` (a directory that exists),
    waiting for it: a resolve's whole run, or a layout's few writes of one record. Not
    to be taken again inside: a second flock of the file in one process waits for the
    first."""
    fd = os.open(records / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # Unlocked, not only closed: a layout's stream forked meanwhile holds a copy
            # of the descriptor, and with it the lock, until it exits.
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def resolving(records: Path) -> Iterator[None]:
    """Hold the lock of the conflict records in `records` for a resolve: one at a time
    (one takes a moment, so the next waits for it), and no layout writes a record or a
    stored version meanwhile."""
    with records_locked(records):
        for stale in records.glob(f".*{INTENT}.tmp.*"):  # a killed run's, half written
            stale.unlink(missing_ok=True)
        yield


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


def write_intent(records: Path, cid: str, intent: Intent) -> None:
    """Write conflict `cid`'s intent whole and durably, before any of it is applied."""
    tmp = records / f".{cid}{INTENT}.tmp.{os.getpid()}"
    write_durably(tmp, (json.dumps(asdict(intent), indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, records / f"{cid}{INTENT}")
    fsync_dir(records)


def read_intent(records: Path, cid: str) -> Intent | None:
    """Conflict `cid`'s intent, which a killed resolve left; None if there is none."""
    path = records / f"{cid}{INTENT}"
    try:
        doc = json.loads(path.read_bytes())
        intent = Intent(**doc)
        if (
            intent.keep not in CHOICES
            or not isinstance(intent.file, str | None)
            or not isinstance(intent.put, dict)
            or not isinstance(intent.at, str)
            or not isinstance(intent.incoming, dict | None)
        ):
            raise ValueError("a field of the wrong value or type")
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:  # not JSON, or not an intent
        raise UserError(
            f"{path} is damaged: {exc}",
            hint="look at the file and the stored version, remove it, resolve again",
        ) from exc
    return intent


def drop_intent(records: Path, cid: str) -> None:
    """Remove conflict `cid`'s intent once its resolution is recorded."""
    (records / f"{cid}{INTENT}").unlink(missing_ok=True)
    fsync_dir(records)
