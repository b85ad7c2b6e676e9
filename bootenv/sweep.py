"""Remove the temp names a killed layout left, whichever components the next one lays out.

A layout makes each entry under a temp name in its final directory (atfd.py) and renames
it into place; a run killed mid-way (kill -9, a power cut, a stream the OOM killer took)
leaves the temps it had not renamed, a partial file among them. A re-run of the same
component with the same blob makes the same temp names and removes each as it goes
(atfd.fresh), but a run of other components, or of another blob (other names), never
would. So a layout, holding the root's lock before it writes anything else, removes them
first for every component a run left unfinished, laid out by this run or not: each
piece logs the directories it makes temp names in (journal.TempLog) until the component
is in, and only those are looked in, never the whole tree. A layout with no such log
reads none of the target's directories but the root itself, for spill files.

What a killed run placed under its final names stays: nothing records which of them that
run placed rather than an earlier one, the OS or another component, and a layout of the
component finishes it. A component the image of this run does not have any more is
swept all the same (the log names its directories, not its blob), with a warning that
it is left half laid out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bootenv.atfd import TMP_PREFIX, dir_under
from bootenv.journal import DIRS_DIR, TEMPS_DIR, logged_dirs
from bootenv.log import human_bytes, printable
from bootenv.manifest import valid_name
from bootenv.paxread import ArchiveError

log = logging.getLogger(__name__)

# fetchahead.py's named spill file, on a filesystem without O_TMPFILE: unlinked right
# after mkstemp made it, unless a kill came between the two.
SPILL_PREFIX = f"{TMP_PREFIX}piece-"


@dataclass
class Swept:
    """What the sweep of one component did."""

    component: str
    dirs: int = 0  # directories looked in
    removed: int = 0  # temp entries removed
    freed: int = 0  # bytes of the disk that their removal gave back
    unreachable: int = 0  # logged directories not looked in: a symlink or not a directory on the way
    left: list[str] = field(default_factory=list)  # temp entries that could not be removed, and why


def sweep(root: Path, laying_out: set[str], offered: set[str] | None) -> list[Swept]:
    """Remove what killed runs left under temp names in `root` (resolved, and locked by
    the caller), and log one line per component swept. `laying_out`: the components
    this run lays out; `offered`: those its image has (None: it read no image)."""
    _spill_files(root)
    done = []
    for name, dirs in sorted(_unfinished(root).items()):
        swept = _sweep_component(root, name, dirs)
        _report(swept, laying_out, offered)
        done.append(swept)
    return done


def _unfinished(root: Path) -> dict[str, list[str]]:
    """The components a run left unfinished and not swept yet, each with the directories
    it may have left temp names in. A run of a bootenv before the TempLog logged only
    the directories a component made (its DirLog): those and their parents (where a
    directory's temp was), for a component without a TempLog."""
    out: dict[str, list[str]] = {}
    for name in _listed(root / TEMPS_DIR):
        with contextlib.suppress(OSError):
            st = (root / TEMPS_DIR / name).lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size:  # empty: swept, and nothing made since
                out[name] = logged_dirs(root / TEMPS_DIR / name)
    for name in _listed(root / DIRS_DIR):
        if not os.path.lexists(root / TEMPS_DIR / name):
            made = logged_dirs(root / DIRS_DIR / name)
            out[name] = sorted({*made, *(rel.rpartition("/")[0] for rel in made)})
    return out


def _listed(directory: Path) -> list[str]:
    """The component logs in one of the journal's directories: names of components only
    (a temp a journal write left starts with a dot)."""
    try:
        return [n for n in os.listdir(directory) if valid_name(n)]
    except FileNotFoundError:
        return []


def _sweep_component(root: Path, component: str, dirs: list[str]) -> Swept:
    """Remove `component`'s temp names from the logged `dirs`, then mark it swept (its
    TempLog emptied), unless one could not be removed: the next layout tries again."""
    swept = Swept(component)
    prefix = f"{TMP_PREFIX}{component}~"
    for rel in sorted(set(dirs)):
        if not _relative(rel):
            swept.unreachable += 1
            continue
        try:
            with dir_under(root, rel) as dfd:
                if dfd is not None:
                    swept.dirs += 1
                    _sweep_dir(dfd, rel, prefix, swept)
        except ArchiveError:  # a symlink or not a directory on the way: nothing of ours is there
            swept.unreachable += 1
        except OSError as exc:
            swept.left.append(f"/{printable(rel)}: {exc.strerror}")
    if not swept.left:
        _mark_swept(root, component)
    return swept


def _mark_swept(root: Path, component: str) -> None:
    """No TempLog: nothing to sweep. Beside a DirLog, which stays until the component is
    in (a layout of it gives those directories their mtimes), an empty one says so."""
    path = root / TEMPS_DIR / component
    if not os.path.lexists(root / DIRS_DIR / component):
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _sweep_dir(dfd: int, rel: str, prefix: str, swept: Swept) -> None:
    """Remove the entries named `prefix`... in directory `dfd`, none followed: a file, a
    symlink, a fifo, a device node, or the empty directory a killed mkdir left. Synced
    once if any went, so a power cut does not bring them back once the log is empty."""
    removed = 0
    for name in os.listdir(dfd):
        if not name.startswith(prefix):
            continue
        where = f"/{rel}/{name}" if rel else f"/{name}"
        try:
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=dfd)  # a temp directory is renamed before anything goes in it
            else:
                os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            swept.left.append(f"{printable(where)}: {exc.strerror}")
            continue
        removed += 1
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # a hard link's temp frees nothing
            swept.freed += st.st_blocks * 512
    if removed:
        os.fsync(dfd)
    swept.removed += removed


def _relative(rel: str) -> bool:
    """A logged directory is a path from the root: none that could lead out of it."""
    return rel == "" or (
        not rel.startswith("/") and "\0" not in rel and all(p not in ("", ".", "..") for p in rel.split("/"))
    )


def _report(swept: Swept, laying_out: set[str], offered: set[str] | None) -> None:
    name = swept.component
    what = (
        f"{name}: a layout did not finish it: removed {swept.removed} temp entries "
        f"({human_bytes(swept.freed)}) it left in {swept.dirs} directories"
    )
    if swept.unreachable:
        what += f" ({swept.unreachable} not looked in: a symlink or not a directory on the way)"
    if name in laying_out:
        log.info("%s; this run lays it out", what)
    elif offered is not None and name not in offered:
        log.warning(
            "%s; this image has no component %s: the files that layout placed stay, half laid out",
            what,
            name,
        )
    else:
        log.warning(
            "%s; the files it placed stay, half laid out, until a layout of %s finishes it", what, name
        )
    if swept.left:
        log.warning(
            "%s: %d temp entries not removed (the next layout tries again): %s",
            name,
            len(swept.left),
            "; ".join(swept.left[:3]),
        )


def _spill_files(root: Path) -> None:
    """Remove the spill files (fetchahead.py) a kill left in the root directory."""
    with dir_under(root, "") as dfd:
        assert dfd is not None
        removed, freed = 0, 0
        for name in os.listdir(dfd):
            if not name.startswith(SPILL_PREFIX) or "~" in name[len(SPILL_PREFIX) :]:
                continue  # "~" after it: a temp of a component named piece-...
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(name, dir_fd=dfd)
                if stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
                    freed += st.st_blocks * 512
    if removed:
        log.info("removed %d spill files (%s) a killed layout left in %s", removed, human_bytes(freed), root)
