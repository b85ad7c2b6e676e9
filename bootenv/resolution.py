"""Resolving a conflict: `bootenv conflicts resolve` keeps one side, keeps the merge, or
puts the admin's file in place, then records what it did (conflicts.py keeps the
records). Every file is reached from the root without following a symlink, and a
resolution that writes a file's bytes does so through a temp file beside it, which a
resolve killed before its rename leaves: the next one removes it (resolvetemps.py).

A resolution is an intent written durably first (the choice, and what the path holds
once it is applied), then applied, then recorded: a resolve killed at any point is
finished by the next one that asks for the same, which does only what is not done yet;
if its conflict was resolved another way since (a layout retired it), or holds another
incoming version (a layout found a newer one), that one says so and fails, as its
choice was never recorded, and was not made for that version.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootenv.conflicts import (
    EDITED,
    KEEP,
    MERGED,
    RECORDS,
    SUPERSEDED,
    Conflict,
    describe,
    find,
    load,
    load_all,
    lstat_at,
    now,
    remove_at,
    save,
    small_file,
    text_lines,
    under,
)
from bootenv.errors import UserError
from bootenv.merge import concatenate, record_dir
from bootenv.resolvetemps import (
    INTENT,
    Intent,
    drop_intent,
    read_intent,
    remove_killed,
    resolving,
    temp_name,
    write_intent,
)
from bootenv.writeback import replace_at
from bootenv.xattrs import xattrs_of


def resolve(root: Path, cid: str, keep: str | None, file: Path | None) -> Conflict:
    """Apply and record a resolution: keep one side, keep the merge, or supply a file.
    Every file is reached from the root without following a symlink."""
    load(root, cid)  # none: an error, and no lock file made
    with resolving(root / RECORDS):
        found = load_all(root)  # read again under the lock: another resolve may have been first
        remove_killed(root, {c.path.rpartition("/")[0] for c in found})
        return _resolve(root, find(found, root, cid), keep, file)


def _resolve(root: Path, c: Conflict, keep: str | None, file: Path | None) -> Conflict:
    """Resolve `c`, under the lock: decide (the intent, written first), apply, record.
    A resolve killed on the way left its intent, which this one finishes, if it asks
    for the same (resolvetemps.py)."""
    if file is None and keep not in KEEP:
        raise UserError("say --keep existing|incoming|merged or --file F")
    records = root / RECORDS
    want = "file" if file is not None else str(keep)
    admins = None if file is None else str(file.absolute())
    pending = read_intent(records, c.id)
    if pending is not None and (pending.keep, pending.file) != (want, admins):
        raise UserError(
            f"conflict {c.id}: a resolve {pending.asked()} was stopped before it ended",
            hint="run that one again to finish it",
        )
    if c.resolution:
        if pending is None:
            raise UserError(f"conflict {c.id} is already resolved ({c.resolution.get('keep')})")
        drop_intent(records, c.id)  # it can only have been stopped, or be, not finished
        if (c.resolution.get("keep"), c.resolution.get("at")) != (pending.keep, pending.at):
            raise _resolved_since(c, pending)
        return c  # it was stopped once its record was written
    if pending is not None and pending.incoming not in (None, c.incoming):
        drop_intent(records, c.id)
        raise UserError(
            f"conflict {c.id}: the resolve {pending.asked()} that was stopped was not finished:"
            f" a layout has found another version of /{c.path} since, which it was not asked for",
            hint=f"see `bootenv conflicts show {c.id}`, then resolve again",
        )
    with under(root, c.path) as (tfd, tname), under(root, c.stored) as (sfd, sname):
        at = _Sides(root, c, tfd, tname, sfd, sname)
        data = None
        if pending is None:
            put, data = at.plan(want, file)
            pending = Intent(want, admins, put, now(), c.incoming)
            write_intent(records, c.id, pending)
        at.apply(pending, file, data)
    res = {"keep": want, "at": pending.at}
    if file is not None:
        res["file"] = str(file)
    done = Conflict(**{**c.__dict__, "resolution": res})
    save(records / f"{c.id}.json", done.__dict__)
    drop_intent(records, c.id)
    return done


def _resolved_since(c: Conflict, pending: Intent) -> UserError:
    """A resolve that was stopped, whose conflict was resolved another way since: a
    layout that no longer found it retired it. Its choice was never recorded, and
    perhaps never applied; the admin is told, not shown a success."""
    res = c.resolution or {}
    how = (
        f"superseded: a later layout of {c.component} found no conflict there"
        if res.get("keep") == SUPERSEDED
        else f"{res.get('keep')}"
    )
    return UserError(
        f"conflict {c.id}: the resolve {pending.asked()} that was stopped was not finished:"
        f" the conflict was resolved since ({how}); /{c.path} is left as it is",
        hint=f"see `bootenv conflicts show {c.id}`",
    )


@dataclass(frozen=True)
class _Sides:
    """A conflict's two versions: the path in place (`tname` in `tfd`, None if its
    directory is missing) and the stored incoming one (`sname` in `sfd`)."""

    root: Path
    c: Conflict
    tfd: int | None
    tname: str
    sfd: int | None
    sname: str

    def plan(self, want: str, file: Path | None) -> tuple[dict[str, Any], bytes | None]:
        """What the path holds once `want` is applied, checked before anything is
        written, and the bytes to put there (if they are bytes)."""
        c = self.c
        if want == "existing" or (want == "merged" and c.reason == MERGED):
            return {}, None  # a merge listed for review: it is in place already
        if want == "incoming":
            _check_incoming(c, self.tfd, self.tname, self.sfd, self.sname)
            return _described(self.sfd, self.sname), None
        data = file.read_bytes() if file is not None else self.merged()
        _check_regular(self.tfd, self.tname, c.path)
        return {"sha256": hashlib.sha256(data).hexdigest()}, data

    def apply(self, intent: Intent, file: Path | None, data: bytes | None) -> None:
        """Apply `intent`, but for what is done already: a step a killed run did is not
        done again (a merge appended twice)."""
        c, tfd, tname, sfd, sname = self.c, self.tfd, self.tname, self.sfd, self.sname
        if not intent.put:
            remove_at(sfd, sname)
        elif intent.keep == "incoming":
            if lstat_at(sfd, sname) is None and _described(tfd, tname) == intent.put:
                return  # renamed into place by the run that was stopped
            if lstat_at(sfd, sname) is not None and _described(sfd, sname) != intent.put:
                raise self.changed(intent)
            _put_incoming(c, tfd, tname, sfd, sname)
        else:
            if _described(tfd, tname).get("sha256") != intent.put["sha256"]:
                if data is None:  # a run that was stopped: the same bytes, made again
                    try:
                        data = file.read_bytes() if file is not None else self.merged()
                    except (UserError, OSError) as exc:
                        raise self.changed(intent) from exc
                if hashlib.sha256(data).hexdigest() != intent.put["sha256"]:
                    raise self.changed(intent)
                _replace_content(tfd, tname, data, c.path)
            if intent.keep == "merged":
                remove_at(sfd, sname)

    def merged(self) -> bytes:
        """The file in place with the component's version appended: its own part, for
        an edited merge, whose incoming version is the whole merge the admin's file
        already holds most of."""
        c, tfd, tname, sfd, sname = self.c, self.tfd, self.tname, self.sfd, self.sname
        mine = _own_part(self.root, c) if c.reason == EDITED else small_file(sfd, sname)
        old = small_file(tfd, tname)
        if text_lines(old) is None or text_lines(mine) is None:
            raise UserError(f"{c.path}: only two text files can be merged")
        _same_metadata(c, tfd, tname, sfd, sname)
        assert old is not None and mine is not None
        return concatenate(old, {c.component: mine})

    def changed(self, intent: Intent) -> UserError:
        return UserError(
            f"conflict {self.c.id}: a resolve {intent.asked()} was stopped before it ended, and"
            f" /{self.c.path} or what it puts there has changed since",
            hint=f"look at both, then remove /{RECORDS}/{self.c.id}{INTENT} and resolve again",
        )


def _described(dfd: int | None, name: str) -> dict[str, Any]:
    return describe(f"/proc/self/fd/{dfd}/{name}") if dfd is not None else {"type": "missing"}


def _same_metadata(c: Conflict, tfd: int | None, tname: str, sfd: int | None, sname: str) -> None:
    """Refuse to merge two versions whose owner, group, mode or xattrs (an ACL) differ:
    the merge keeps the file in place's, and would give them the incoming text (a 0600
    file's password in a 0644 file), as a layout refuses to (sharedpaths.py)."""
    old, new = lstat_at(tfd, tname), lstat_at(sfd, sname)
    if old is None or new is None or tfd is None or sfd is None:
        return
    unlike = [
        what
        for what, a, b in (
            ("owner", old.st_uid, new.st_uid),
            ("group", old.st_gid, new.st_gid),
            ("mode", stat.S_IMODE(old.st_mode), stat.S_IMODE(new.st_mode)),
            ("xattrs", xattrs_of(tfd, tname), xattrs_of(sfd, sname)),
        )
        if a != b
    ]
    if unlike:
        words = unlike[0] if len(unlike) == 1 else f"{', '.join(unlike[:-1])} and {unlike[-1]}"
        raise UserError(
            f"/{c.path}: not merged: the two versions' {words} differ; a merge keeps the existing one's",
            hint="--keep existing or incoming, or merge them by hand",
        )


def _check_incoming(c: Conflict, tfd: int | None, tname: str, sfd: int | None, sname: str) -> None:
    """Refuse to put the incoming version in place where rename(2) cannot: a directory
    is never replaced, nor replaced by one."""
    new = lstat_at(sfd, sname)
    if new is None:
        raise UserError(f"the incoming version of /{c.path} (/{c.stored}) is missing")
    if tfd is None:
        raise UserError(f"/{c.path.rpartition('/')[0]} is missing: resolve /{c.path} by hand")
    old = lstat_at(tfd, tname)
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise UserError(f"{c.path} is a directory; replace it by hand")
    if old is not None and stat.S_ISDIR(new.st_mode):
        raise UserError(
            f"the incoming /{c.path} is a directory and the existing one is not",
            hint=f"remove /{c.path}, then resolve again",
        )


def _put_incoming(c: Conflict, tfd: int | None, tname: str, sfd: int | None, sname: str) -> None:
    """Rename the incoming version over the existing one."""
    _check_incoming(c, tfd, tname, sfd, sname)
    assert tfd is not None and sfd is not None
    os.rename(sname, tname, src_dir_fd=sfd, dst_dir_fd=tfd)
    os.fsync(tfd)
    os.fsync(sfd)


def _own_part(root: Path, c: Conflict) -> bytes:
    """`c.component`'s own version of `c.path`, from the merge records."""
    rel = (record_dir(root, c.path) / f"part.{c.component}").relative_to(root)
    with under(root, str(rel)) as (dfd, name):
        part = small_file(dfd, name)
    if part is None:
        raise UserError(
            f"{c.path}: {c.component}'s own version is not in the merge records",
            hint="--keep existing or incoming, or --file F",
        )
    return part


def _check_regular(dfd: int | None, name: str, relpath: str) -> os.stat_result:
    st = lstat_at(dfd, name)
    if dfd is None or st is None:
        raise UserError(f"/{relpath} is missing: resolve it by hand")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"/{relpath} is not a regular file")
    return st


def _replace_content(dfd: int | None, name: str, data: bytes, relpath: str) -> None:
    """Replace a regular file's bytes atomically and durably, keeping its owner, mode and
    xattrs (an ACL that lets a service read it, a file capability)."""
    st = _check_regular(dfd, name, relpath)
    assert dfd is not None
    replace_at(dfd, name, data, like=st, tmp=temp_name(), xattrs=xattrs_of(dfd, name))
    os.fsync(dfd)
