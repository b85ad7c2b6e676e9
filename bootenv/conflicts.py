"""Conflicts: a component's file that could neither be skipped nor merged.

The file already in place is kept. The incoming version is stored under
`/var/lib/bootenv/conflicts/<component>/<path>` and described by a JSON record in
`/var/lib/bootenv/conflict-records/<id>.json`, where the id is derived from the
component and the path, so a re-run rewrites the same record. `bootenv conflicts`
lists, shows (with a unified diff for text) and resolves them; a resolution is recorded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bootenv.errors import UserError
from bootenv.merge import MAX_MERGE, concatenate, is_text, record_dir
from bootenv.writeback import fsync_dir, replace_at, write_durably

RECORDS = Path("var/lib/bootenv/conflict-records")
STORE = Path("var/lib/bootenv/conflicts")
KEEP = ("existing", "incoming", "merged")
# The reason of a conflict whose incoming version is a whole merge (the base and every
# component's part) that would have replaced a merged file the admin has edited since.
EDITED = "edited here since bootenv merged it"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conflict:
    id: str
    component: str
    path: str  # relative to the root
    reason: str
    existing: dict[str, Any]
    incoming: dict[str, Any]
    stored: str  # where the incoming version is, relative to the root
    resolution: dict[str, Any] | None = None


def conflict_id(component: str, relpath: str) -> str:
    return hashlib.sha256(f"{component}\0{relpath}".encode(errors="surrogateescape")).hexdigest()[:12]


def stored_path(component: str, relpath: str) -> str:
    return f"{STORE}/{component}/{relpath}"


def describe(path: str) -> dict[str, Any]:
    """Type, size, mode, owner and content hash (or link target) of a path, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"type": "missing"}
    d: dict[str, Any] = {
        "type": _kind(st.st_mode),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if stat.S_ISREG(st.st_mode):
        d["size"] = st.st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        d["sha256"] = h.hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        d["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return d


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
    ):
        if test(mode):
            return name
    return "other"


def write_record(root: Path, conflict: Conflict) -> None:
    """Atomically (re)write a conflict record, keeping a resolution already made of the
    same incoming version (a re-run). Another version (a newer image of the component,
    another merge) is a conflict the admin has not seen: it is open again."""
    d = root / RECORDS
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{conflict.id}.json"
    body = conflict.__dict__.copy()
    if path.exists():
        try:
            old = _read(path)
        except UserError as exc:
            log.warning("%s: written again, without its resolution", exc)
        else:
            if old.resolution and old.incoming == conflict.incoming:
                body["resolution"] = old.resolution
            elif old.resolution:
                log.info("conflict %s: another version of /%s, open again", conflict.id, conflict.path)
    _write_record(path, body)


def _write_record(path: Path, body: dict[str, Any]) -> None:
    """Write a conflict record whole and durably (a temp file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    write_durably(tmp, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def clean_stale(root: Path) -> None:
    """Remove record temp files a killed run left behind (called before a layout runs)."""
    d = root / RECORDS
    if d.is_dir():
        for stale in d.glob(".*.json.tmp.*"):
            stale.unlink(missing_ok=True)


def load_all(root: Path) -> list[Conflict]:
    return sorted(_records(root, skip_damaged=False), key=lambda c: (c.path, c.component))


def open_ids(root: Path) -> dict[str, tuple[str, ...]]:
    """Each component's conflicts that are not resolved, by id: what a layout that finds
    a component laid out by an earlier run reports again. A damaged record is left to
    `bootenv conflicts`, which names it."""
    found: dict[str, list[str]] = {}
    for c in _records(root, skip_damaged=True):
        if not c.resolution:
            found.setdefault(c.component, []).append(c.id)
    return {name: tuple(ids) for name, ids in found.items()}


def _records(root: Path, *, skip_damaged: bool) -> Iterator[Conflict]:
    d = root / RECORDS
    for path in sorted(d.glob("*.json")) if d.is_dir() else ():
        try:
            yield _read(path)
        except UserError as exc:
            if not skip_damaged:
                raise
            log.warning("%s", exc)


def _read(path: Path) -> Conflict:
    try:
        doc = json.loads(path.read_bytes())
        return Conflict(**doc)
    except (ValueError, TypeError) as exc:  # not JSON, or not a record (a list, a missing key)
        raise UserError(f"conflict record {path} is damaged: {exc}", hint="restore it, or remove it") from exc


def load(root: Path, cid: str) -> Conflict:
    for c in load_all(root):
        if c.id == cid:
            return c
    raise UserError(f"no conflict {cid!r} under {root}", hint="see `bootenv conflicts list`")


def _text(path: Path) -> list[str] | None:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MERGE:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if not is_text(data):
        return None
    return data.decode().splitlines(keepends=True)


def diff(root: Path, c: Conflict) -> str:
    """A unified diff from the existing to the incoming version, or "" if not both text."""
    old, new = _text(root / c.path), _text(root / c.stored)
    if old is None or new is None:
        return ""
    return "".join(difflib.unified_diff(old, new, f"existing/{c.path}", f"{c.component}/{c.path}"))


def resolve(root: Path, cid: str, keep: str | None, file: Path | None) -> Conflict:
    """Apply and record a resolution: keep one side, keep the merge, or supply a file."""
    c = load(root, cid)
    if c.resolution:
        raise UserError(f"conflict {cid} is already resolved ({c.resolution.get('keep')})")
    target, incoming = root / c.path, root / c.stored
    if _through_symlink(root, c.path) or _through_symlink(root, c.stored):
        raise UserError(f"{c.path}: a parent directory is a symlink; resolve it by hand")
    if file is not None:
        _replace_content(target, file.read_bytes())
        keep = "file"
    elif keep == "existing":
        _remove(incoming)
    elif keep == "incoming":
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"{c.path} is a directory; replace it by hand")
        os.replace(incoming, target)
    elif keep == "merged":
        # An edited merge's incoming version is the whole merge, which the admin's file
        # already holds most of: theirs takes only the component's own part.
        mine = _own_part(root, c) if c.reason == EDITED else incoming
        old, new = _text(target), _text(mine)
        if old is None or new is None:
            raise UserError(f"{c.path}: only two text files can be merged")
        _replace_content(target, concatenate(target.read_bytes(), {c.component: mine.read_bytes()}))
        _remove(incoming)
    else:
        raise UserError("say --keep existing|incoming|merged or --file F")
    res = {"keep": keep, "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if file is not None:
        res["file"] = str(file)
    done = Conflict(**{**c.__dict__, "resolution": res})
    _write_record(root / RECORDS / f"{cid}.json", done.__dict__)
    return done


def _own_part(root: Path, c: Conflict) -> Path:
    """Where the merge records keep `c.component`'s own version of `c.path`."""
    part = record_dir(root, c.path) / f"part.{c.component}"
    if not part.is_file():
        raise UserError(
            f"{c.path}: {c.component}'s own version is not in the merge records",
            hint="--keep existing or incoming, or --file F",
        )
    return part


def _through_symlink(root: Path, relpath: str) -> bool:
    cur = root
    for part in Path(relpath).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            return True
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace_content(target: Path, data: bytes) -> None:
    """Replace a regular file's bytes atomically and durably, keeping its owner and mode."""
    st = target.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{target} is not a regular file")
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_at(dfd, target.name, data, like=st, tmp=f".bootenv~resolve.{os.getpid()}")
        os.fsync(dfd)
    finally:
        os.close(dfd)
