"""Resolving a conflict: `bootenv conflicts resolve` keeps one side, keeps the merge, or
puts the admin's file in place, then records what it did (conflicts.py keeps the
records). Every file is reached from the root without following a symlink, and a
resolution that writes a file's bytes does so through a temp file beside it, which a
resolve killed before its rename leaves: the next one removes it (resolvetemps.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bootenv.conflicts import (
    EDITED,
    KEEP,
    MERGED,
    RECORDS,
    Conflict,
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
from bootenv.resolvetemps import remove_killed, resolving, temp_name
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
    """Resolve `c`, under the lock: apply and record the resolution."""
    if c.resolution:
        raise UserError(f"conflict {c.id} is already resolved ({c.resolution.get('keep')})")
    if file is None and keep not in KEEP:
        raise UserError("say --keep existing|incoming|merged or --file F")
    with under(root, c.path) as (tfd, tname), under(root, c.stored) as (sfd, sname):
        if file is not None:
            _replace_content(tfd, tname, file.read_bytes(), c.path)
            keep = "file"
        elif keep == "existing" or (keep == "merged" and c.reason == MERGED):
            remove_at(sfd, sname)  # a merge listed for review: it is in place already
        elif keep == "incoming":
            _put_incoming(c, tfd, tname, sfd, sname)
        else:
            # An edited merge's incoming version is the whole merge, which the admin's
            # file already holds most of: theirs takes only the component's own part.
            mine = _own_part(root, c) if c.reason == EDITED else small_file(sfd, sname)
            old = small_file(tfd, tname)
            if text_lines(old) is None or text_lines(mine) is None:
                raise UserError(f"{c.path}: only two text files can be merged")
            _same_metadata(c, tfd, tname, sfd, sname)
            assert old is not None and mine is not None
            _replace_content(tfd, tname, concatenate(old, {c.component: mine}), c.path)
            remove_at(sfd, sname)
    res = {"keep": keep, "at": now()}
    if file is not None:
        res["file"] = str(file)
    done = Conflict(**{**c.__dict__, "resolution": res})
    save(root / RECORDS / f"{c.id}.json", done.__dict__)
    return done


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


def _put_incoming(c: Conflict, tfd: int | None, tname: str, sfd: int | None, sname: str) -> None:
    """Rename the incoming version over the existing one (a directory is never replaced,
    nor replaced by one: rename(2) cannot do either whole)."""
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
    os.rename(sname, tname, src_dir_fd=sfd, dst_dir_fd=tfd)
    os.fsync(tfd)
    assert sfd is not None
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


def _replace_content(dfd: int | None, name: str, data: bytes, relpath: str) -> None:
    """Replace a regular file's bytes atomically and durably, keeping its owner, mode and
    xattrs (an ACL that lets a service read it, a file capability)."""
    st = lstat_at(dfd, name)
    if dfd is None or st is None:
        raise UserError(f"/{relpath} is missing: resolve it by hand")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"/{relpath} is not a regular file")
    replace_at(dfd, name, data, like=st, tmp=temp_name(), xattrs=xattrs_of(dfd, name))
    os.fsync(dfd)
