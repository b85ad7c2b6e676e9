"""Before a layout's first write to its root (layout.py calls these, once the image is
trusted): a symlink on the way to bootenv's own records under the root refused, and the
root's layout lock taken, which lets one layout at a time write to it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bootenv.conflicts import RECORDS, STORE
from bootenv.errors import UserError
from bootenv.hold import HELD_DIR
from bootenv.journal import DIRS_DIR, STATE_DIR, TEMPS_DIR
from bootenv.merge import STATE
from bootenv.shareddirs import RECORDS as DIR_RECORDS

# bootenv's own records, parents first: the journal, the merge records, the conflicts.
_STATE_DIRS = sorted(
    {
        str(parent)
        for d in (
            STATE_DIR,
            DIRS_DIR,
            TEMPS_DIR,
            STATE / "merge",
            STATE / "owners",
            HELD_DIR,
            DIR_RECORDS,
            RECORDS,
            STORE,
        )
        for parent in (d, *d.parents)
    }
    - {"."},
    key=lambda rel: (rel.count("/"), rel),
)


def refuse_symlinked_state(root: Path) -> None:
    """The records are reached by path, so a symlink on the way to them (a `/var ->
    /data/var` that the installed system resolves its own way) would take them outside
    the root, into the machine running the layout. Refused before anything is written;
    the tree writer and the dpkg merge would refuse the symlink later anyway."""
    for rel in _STATE_DIRS:
        path = root / rel
        if path.is_symlink():
            raise UserError(
                f"/{rel} under {root} is a symlink (to {os.readlink(path)}): "
                "bootenv's records would be written outside the root",
                hint="make it a directory in the target",
            )


@contextlib.contextmanager
def alone(root: Path) -> Iterator[None]:
    """Hold the root's layout lock for a layout: two at once (an admin's next to the
    first-boot unit's) would take each other's temp files for a killed run's, and write
    the same journal. A POSIX record lock (lockf), which belongs to this process alone:
    its forked streams do not hold it, so it ends with the layout, even killed -9 (the
    streams, which then die of it too, do so a moment later)."""
    where = root / STATE
    where.mkdir(parents=True, exist_ok=True)
    fd = os.open(where / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(
                f"another layout is running on {root}",
                hint="wait for it to end (systemctl status bootenv-layout)",
            ) from None
        yield
    finally:
        os.close(fd)
