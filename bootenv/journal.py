"""The layout journal: how far each component got, so a re-run resumes safely.

One small JSON file per component under ROOT/var/lib/bootenv/layout/state/, replaced
atomically and fsynced: `files` (every entry is in place and the blob verified, after a
syncfs), `dpkg` (its status paragraphs are merged), `done` (activated). A phase belongs
to one blob (by sha256), so a new image lays the component out again. Everything a
layout does before `files` is idempotent by construction (temp names, no-replace
renames, merges rebuilt from recorded parts), so an interrupted component is simply
laid out again.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from bootenv.writeback import sync_filesystem

STATE_DIR = Path("var/lib/bootenv/layout/state")
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
