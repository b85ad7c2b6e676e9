"""The layout journal: how far each component got, so a re-run resumes safely.

One small JSON file per component under ROOT/var/lib/bootenv/layout/state/, replaced
atomically and fsynced: `files` (every entry is in place and the blob verified, after a
syncfs), `dpkg` (its status paragraphs are merged), `done` (activated). A phase belongs
to one blob (by sha256), so a new image lays the component out again. Everything a
layout does before `files` is idempotent by construction (temp names, no-replace
renames, merges rebuilt from recorded parts), so an interrupted component is simply
laid out again.

A component's directories get their mtimes last, once all its files are in. So that a
re-run can do that for the directories a killed run made (they exist by then, and the
re-run makes none of them), the first piece logs each directory it makes in
ROOT/var/lib/bootenv/layout/dirs/<component> until the component reaches `files`.

Each piece also logs, before it makes its first temp name in a directory, that
directory, in ROOT/var/lib/bootenv/layout/temps/<component> (TempLog): the next layout
removes the temp names a killed run left by looking in those directories alone, not by
walking the tree (sweep.py), also for a component it does not lay out.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from bootenv.writeback import sync_filesystem

STATE_DIR = Path("var/lib/bootenv/layout/state")
DIRS_DIR = Path("var/lib/bootenv/layout/dirs")
TEMPS_DIR = Path("var/lib/bootenv/layout/temps")
PHASES = ("files", "dpkg", "done")
_fsync = os.fsync  # tests that only simulate kill -9 (not a power cut) may skip the flushes


def syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` (cheaper than a global sync). OSError if the
    kernel reports a write error; a kernel without syncfs gets a global sync."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync_filesystem(fd)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        os.sync()
    finally:
        os.close(fd)


class Journal:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / STATE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def phase(self, component: str, sha256: str) -> str | None:
        """The last phase `component` reached with this blob, or None."""
        try:
            doc = json.loads((self.dir / f"{component}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("sha256") != sha256 or doc.get("phase") not in PHASES:
            return None
        phase: str = doc["phase"]
        return phase

    def reached(self, component: str, sha256: str, phase: str) -> bool:
        got = self.phase(component, sha256)
        return got is not None and PHASES.index(got) >= PHASES.index(phase)

    def set(self, component: str, sha256: str, phase: str) -> None:
        path = self.dir / f"{component}.json"
        tmp = self.dir / f".{component}.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"component": component, "sha256": sha256, "phase": phase}, f)
            f.flush()
            _fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fsync(dfd)
        finally:
            os.close(dfd)
        if phase == "files":  # its directories have their mtimes, its temps are gone: no log is needed
            (self.root / DIRS_DIR / component).unlink(missing_ok=True)
            (self.root / TEMPS_DIR / component).unlink(missing_ok=True)


class _AppendLog:
    """A component's log that lines are only ever added to: each with one write (O_APPEND:
    a kill leaves no line half written but the last), to a file made (0600, never through
    a symlink) with its directory when the log is opened. Closed at the end of the block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o600)
        return self.fd

    def _write(self, line: bytes) -> None:
        os.write(self._open(), line)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DirLog(_AppendLog):
    """The directories a component's first piece made, with the mtimes they end with:
    those of the runs before (killed before the component was in) and this one's, each
    line written as the directory is made (a kill -9 keeps it; a power cut may lose the
    last, whose mtime then stays as it is). The first line names the blob: a log of
    another one is started again."""

    def __init__(self, root: Path, component: str, sha256: str) -> None:
        super().__init__(root / DIRS_DIR / component)
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            lines = []
        if lines and lines[0] != sha256.encode():
            self.path.unlink()
            lines = []
        self.earlier = [e for e in map(_dir_entry, lines[1:]) if e is not None]
        self._open()
        if not lines:
            self._write(sha256.encode() + b"\n")
        elif lines[-1]:  # a line a kill cut short: the next starts on a line of its own
            self._write(b"\n")

    def add(self, name: str, mtime_ns: int) -> None:
        self._write(json.dumps([name, mtime_ns]).encode() + b"\n")


class TempLog(_AppendLog):
    """Where a piece of a component makes temp names: each directory (its path from the
    root) on a line of its own, written before the first temp name in it, so a kill -9
    keeps the line if it keeps the temp. The component's pieces append to one file
    (O_APPEND: each line whole), each piece every directory once; the file is made with
    its first line. What the lines say is read by sweep.py."""

    def __init__(self, root: Path, component: str) -> None:
        super().__init__(root / TEMPS_DIR / component)
        self.noted: set[str] = set()

    def note(self, rel: str) -> None:
        if rel in self.noted:
            return
        self._write(json.dumps(rel).encode() + b"\n")
        self.noted.add(rel)


def logged_dirs(path: Path) -> list[str]:
    """The directories a TempLog or a DirLog at `path` names (none if it is missing),
    without the lines a kill cut short."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:  # a line a kill cut short, or a DirLog's first (its blob)
            continue
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, list) and doc and isinstance(doc[0], str):
            out.append(doc[0])
    return out


def _dir_entry(line: bytes) -> tuple[str, int] | None:
    """A line of a DirLog, or None for one a kill cut short."""
    try:
        name, mtime = json.loads(line)
    except (ValueError, TypeError):  # not JSON, or not a pair
        return None
    return (name, mtime) if isinstance(name, str) and isinstance(mtime, int) else None
