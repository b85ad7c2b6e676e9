"""Conflicts: a component's file that could neither be skipped nor merged.

The file already in place is kept. The incoming version is stored under
`/var/lib/bootenv/conflicts/<component>/<path>` and described by a JSON record in
`/var/lib/bootenv/conflict-records/<id>.json`, where the id is derived from the
component and the path, so a re-run rewrites the same record. `bootenv conflicts`
lists, shows (with a unified diff for text) and resolves them (resolution.py); a
resolution is recorded. One a resolve was stopped on (killed before it recorded its
resolution) is listed open, with the resolve that finishes it (`stopped`).

A merged config is listed the same way, as a kind of its own (reason `merged: review`),
once for each component whose version is in it: the merge is in place, the component's
own version is stored beside it, and a concatenation may hold a directive twice
(`Listen 80`), which only the admin can settle. It is not a conflict: the layout counts
it as merged, not among its conflicts.
`resolve` takes it as it takes a conflict: `existing` or `merged` keep the merge,
`incoming` puts the component's version alone in its place, `--file` the admin's.

A conflict a later layout of its component no longer finds (a newer image ships what is
in place) is retired: its stored copy removed, its record marked resolved, `superseded`,
so that no `resolve --keep incoming` puts the obsolete version in place. The record
stays, for `conflicts list` to say what became of it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bootenv.atfd import dir_under
from bootenv.errors import UserError
from bootenv.log import printable
from bootenv.merge import MAX_MERGE, is_text
from bootenv.paxread import ArchiveError
from bootenv.resolvetemps import read_intent, records_locked
from bootenv.smallfile import read_capped
from bootenv.writeback import fsync_dir, write_durably

RECORDS = Path("var/lib/bootenv/conflict-records")
STORE = Path("var/lib/bootenv/conflicts")
KEEP = ("existing", "incoming", "merged")
# The reason of a conflict whose incoming version is a whole merge (the base and every
# component's part) that would have replaced a merged file the admin has edited since.
EDITED = "edited here since bootenv merged it"
# The reason of a merge listed for review: not a conflict, the merge is in place.
MERGED = "merged: review"
# The resolution of a conflict a later layout of its component no longer found (retire).
SUPERSEDED = "superseded"
_ID = re.compile(r"[0-9a-f]{12}")
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# A record's fields and their types; resolution is None or one of these.
_FIELDS: dict[str, type] = {
    "id": str,
    "component": str,
    "path": str,
    "reason": str,
    "existing": dict,
    "incoming": dict,
    "stored": str,
    "resolution": dict,
}

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
    another merge) is a conflict the admin has not seen: it is open again. The caller
    holds the records' lock (resolvetemps.records_locked)."""
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
            if _holds(old, conflict.incoming):
                body["resolution"] = old.resolution
            elif old.resolution:
                log.info("conflict %s: another version of /%s, open again", conflict.id, conflict.path)
    save(path, body)


def resolved_for(root: Path, cid: str, incoming: dict[str, Any]) -> dict[str, Any] | None:
    """The resolution of conflict `cid` if it was made for this incoming version (which
    write_record keeps: a layout that finds the conflict again neither reports it nor
    stores that version again); else None. A damaged record is left to write_record."""
    path = root / RECORDS / f"{cid}.json"
    try:
        old = _read(path)
    except (UserError, OSError):
        return None
    return old.resolution if _holds(old, incoming) else None


def _holds(old: Conflict, incoming: dict[str, Any]) -> bool:
    """Whether `old`'s resolution holds for `incoming`: made for that version, by the
    admin (a superseded one's version was not found at all, and may come back)."""
    res = old.resolution or {}
    return bool(res) and old.incoming == incoming and res.get("keep") != SUPERSEDED


def retire(root: Path, component: str, found: Iterable[str]) -> None:
    """Retire `component`'s open conflicts that its layout, just ended with all of its
    files, did not `found` again: a later image of it ships what is in place, or nothing
    there. Left open, `resolve --keep incoming` would put the obsolete version in place.
    Its stored copy is removed, then the record marked resolved, `superseded`; called
    before the journal says the component's files are in, so a kill in between leaves
    the record open for the layout that runs again to retire. A merge listed for review
    is not a conflict of the layout's: its record stays. Under the records' lock, taken
    only if there is one to retire (resolvetemps.py)."""
    seen = set(found)

    def stale(c: Conflict) -> bool:
        return c.component == component and not c.resolution and c.reason != MERGED and c.id not in seen

    candidates = [c.id for c in _records(root, skip_damaged=True) if stale(c)]
    if not candidates:
        return  # the common case: nothing written, no lock taken
    gone = []
    with records_locked(root / RECORDS):
        for cid in candidates:
            try:  # read again under the lock: a resolve may have resolved it meanwhile
                c = _read(root / RECORDS / f"{cid}.json")
            except (UserError, FileNotFoundError):
                continue
            if not stale(c):
                continue
            try:
                with under(root, c.stored) as (sfd, sname):
                    remove_at(sfd, sname)
            except UserError as exc:
                log.warning("conflict %s: its stored copy is left: %s", c.id, exc)
            res = {"keep": SUPERSEDED, "at": now()}
            save(root / RECORDS / f"{c.id}.json", {**c.__dict__, "resolution": res})
            gone.append(printable(f"/{c.path}"))
    if gone:
        log.info("%s: no conflict now on %s (superseded)", component, ", ".join(gone))


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def save(path: Path, body: dict[str, Any]) -> None:
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
    a component laid out by an earlier run reports again (a merge listed for review is
    not one). A damaged record is left to `bootenv conflicts`, which names it."""
    found: dict[str, list[str]] = {}
    for c in _records(root, skip_damaged=True):
        if not c.resolution and c.reason != MERGED:
            found.setdefault(c.component, []).append(c.id)
    return {name: tuple(ids) for name, ids in found.items()}


def stopped(root: Path, found: Iterable[Conflict]) -> dict[str, str]:
    """The open conflicts of `found` a resolve was stopped on (a kill, a power cut) before
    it ended, by id: the resolve it was (`--keep merged`), which, run again, finishes it.
    Its intent is there (resolvetemps.py); one beside a resolved record is not a stop:
    only its removal was left, which changes nothing."""
    records = root / RECORDS
    return {
        c.id: intent.asked()
        for c in found
        if not c.resolution and (intent := read_intent(records, c.id)) is not None
    }


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
    """A record, every field checked: it is read back from the disk it describes, and
    its paths say what `resolve` removes and replaces."""
    try:
        doc = json.loads(path.read_bytes())
        return _validated(doc, path.stem)
    except (ValueError, TypeError) as exc:  # not JSON, or not a record (a list, a missing key)
        raise UserError(f"conflict record {path} is damaged: {exc}", hint="restore it, or remove it") from exc


def _validated(doc: Any, stem: str) -> Conflict:
    """The Conflict `doc` describes; ValueError naming what is wrong with it."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if set(doc) != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - set(doc)), sorted(set(doc) - set(_FIELDS))
        raise ValueError(f"missing {missing}" if missing else f"unknown fields {extra}"[:200])
    for name, kind in _FIELDS.items():
        if not isinstance(doc[name], kind) and not (name == "resolution" and doc[name] is None):
            raise ValueError(f"{name} is not a {kind.__name__}")
    if not _ID.fullmatch(doc["id"]) or doc["id"] != stem:
        raise ValueError(f"id {doc['id'][:40]!r} is not the record's name")
    if not _COMPONENT.fullmatch(doc["component"]):
        raise ValueError(f"component {doc['component'][:80]!r} is not a component name")
    _check_relpath(doc["path"], "path")
    _check_relpath(doc["stored"], "stored")
    if not doc["stored"].startswith(f"{STORE}/{doc['component']}/"):
        raise ValueError(f"stored {doc['stored'][:200]!r} is not under /{STORE}/{doc['component']}")
    res = doc["resolution"]
    if res is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in res.items()):
        raise ValueError("resolution holds something that is not a string")
    return Conflict(**doc)


def _check_relpath(value: str, name: str) -> None:
    """A path relative to the root, going down only: no `/` first, no `..`, `.` or empty
    part, no NUL."""
    parts = value.split("/")
    if not value or "\0" in value or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{name} {value[:200]!r} is not a path under the root")


def load(root: Path, cid: str) -> Conflict:
    return find(load_all(root), root, cid)


def find(found: list[Conflict], root: Path, cid: str) -> Conflict:
    for c in found:
        if c.id == cid:
            return c
    raise UserError(f"no conflict {cid!r} under {root}", hint="see `bootenv conflicts list`")


def text_lines(data: bytes | None) -> list[str] | None:
    if data is None or not is_text(data):
        return None
    return data.decode().splitlines(keepends=True)


@contextlib.contextmanager
def under(root: Path, relpath: str) -> Iterator[tuple[int | None, str]]:
    """The fd of the directory ROOT/`relpath` is in (None if it is missing) and its
    name there, every directory on the way reached without following a symlink: a
    symlink planted in the root must not lead a resolution outside it."""
    parent, _, name = relpath.rpartition("/")
    try:
        with dir_under(root, parent) as dfd:
            yield dfd, name
    except ArchiveError as exc:
        raise UserError(f"{exc.message}; resolve /{relpath} by hand") from exc


def small_file(dfd: int | None, name: str) -> bytes | None:
    """The bytes of `name` in `dfd` if it is a regular file (not followed if a symlink)
    of at most MAX_MERGE bytes, else None."""
    if dfd is None:
        return None
    try:
        data = read_capped(name, MAX_MERGE, dir_fd=dfd)
    except (OSError, UserError):
        return None
    return data if len(data) <= MAX_MERGE else None


def diff(root: Path, c: Conflict) -> str:
    """A unified diff from the existing to the incoming version, or "" if not both text."""
    try:
        with under(root, c.path) as (tfd, tname), under(root, c.stored) as (sfd, sname):
            old, new = text_lines(small_file(tfd, tname)), text_lines(small_file(sfd, sname))
    except (UserError, OSError):
        return ""
    if old is None or new is None:
        return ""
    shown = printable(c.path)  # a member's name may hold a newline: one header line each
    return "".join(difflib.unified_diff(old, new, f"existing/{shown}", f"{c.component}/{shown}"))


def lstat_at(dfd: int | None, name: str) -> os.stat_result | None:
    """`name` in the directory `dfd`, not followed; None if it (or the directory) is missing."""
    if dfd is None:
        return None
    try:
        return os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None


def remove_at(dfd: int | None, name: str) -> None:
    st = lstat_at(dfd, name)
    if dfd is None or st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)
    os.fsync(dfd)
