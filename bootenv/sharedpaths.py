"""Shared paths: what becomes of a member whose name is taken when a TreeWriter places it.

A layout never overwrites a path someone else already took (extract.py puts each entry
in place with RENAME_NOREPLACE, atfd.py). When the name is taken, the member is:

- **identical** to the entry in place (same type; same bytes, symlink target or device
  number; same owner, group, mode and xattrs): nothing more; a text config is recorded
  as a version of the file for a later merge (merge.py);
- the same, but for its owner, group, mode or xattrs (a setuid bit, a file capability):
  a conflict, so what the entry in place lacks is shown, not lost without a word;
- the file in place **cut short**: the same file, placed by an earlier run of this
  component that a power cut stopped before its data was on the disk: laid out whole;
- a text config the shared-path rule **merges** (merge.py), if its owner, group, mode
  and xattrs agree with the file in place: the merge is listed for the admin's review,
  each version that is not the whole file beside it; the admin's edit of a merged file
  stays, and the merge is a conflict beside it;
- anything else: a **conflict**. This component's version goes to the conflict store
  beside the record of both (conflicts.py); the entry in place stays. A conflict the
  admin resolved for this very version is neither stored nor reported again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bootenv.atfd import TMP_PREFIX
from bootenv.conflicts import (
    EDITED,
    MERGED,
    RECORDS,
    Conflict,
    conflict_id,
    describe,
    resolved_for,
    stored_path,
    write_record,
)
from bootenv.merge import MAX_MERGE, MergeState, Meta, is_candidate, is_text, normalized
from bootenv.paxread import Member
from bootenv.resolvetemps import records_locked
from bootenv.writeback import write_all
from bootenv.xattrs import xattrs_of

log = logging.getLogger(__name__)


class Tally(Protocol):
    """What a layout counts (extract.Stats) that a member whose name is taken adds to."""

    files: int
    bytes: int
    identical: int
    merged: list[str]
    conflicts: list[str]


@dataclass(frozen=True)
class SharedPaths:
    """What becomes of a TreeWriter's member whose name is taken. All it holds is the
    writer's: its counts, where each member is now (a hardlink to it goes there too), its
    directory fds and its way of setting an xattr."""

    root: Path
    component: str
    tag: str  # in the temp names of merges and review copies, as in the writer's own
    privileged: bool
    merge: MergeState
    stats: Tally
    placed: dict[str, str]
    dir_fd: Callable[[str], int]
    setxattr: Callable[[int | str, str, bytes], None]

    def place(self, m: Member, pfd: int, tmp: str, base: str, data: bytes | None) -> None:
        """Place `m`, made as `tmp` in `pfd`, whose name `base` is taken (`data`: its
        bytes, if they were read)."""
        old = os.lstat(base, dir_fd=pfd)
        new = os.lstat(tmp, dir_fd=pfd)
        self.placed[m.name] = m.name
        if stat.S_IFMT(old.st_mode) == stat.S_IFMT(new.st_mode):
            if _same(pfd, base, tmp, old, new):
                # The same bytes with another owner, mode or xattrs (a setuid bit, a file
                # capability) are not the same file: the one in place stays, and the
                # admin is shown what it lacks.
                unlike = _differ(pfd, base, tmp, old, new, owners=self.privileged)
                if unlike:
                    self.conflict(m, pfd, base, tmp, f"same content, different {_words(unlike)}")
                    return
                if data is not None and is_candidate(m.name, data):
                    self._identical_text(m, pfd, base, data)
                self.stats.identical += 1
                return
            if _cut_short(pfd, base, tmp, old, new):
                os.rename(tmp, base, src_dir_fd=pfd, dst_dir_fd=pfd)  # it is this file, whole
                log.warning(
                    "%s: /%s was cut short (a power cut in an earlier run); laid out whole",
                    self.component,
                    m.name,
                )
                self.stats.files += 1
                self.stats.bytes += m.size
                return
            if (
                data is not None
                and is_candidate(m.name, data)
                and stat.S_ISREG(old.st_mode)
                and self._mergeable_in_place(m.name, pfd, base)
            ):
                # Merged, this version would take the file's owner and mode (a 0600
                # secret in a 0644 file): only a version whose own agree is merged.
                unlike = _differ(pfd, base, tmp, old, new, owners=self.privileged)
                if unlike:
                    self.conflict(m, pfd, base, tmp, f"not merged: different {_words(unlike)}")
                    return
                self._merge(m, pfd, base, data)
                return
        self.conflict(
            m,
            pfd,
            base,
            tmp,
            "different content"
            if stat.S_IFMT(old.st_mode) == stat.S_IFMT(new.st_mode)
            else "different file types",
        )

    def _mergeable_in_place(self, relpath: str, pfd: int, base: str) -> bool:
        """Whether the file in place may take part in a merge. Once a merge has begun at
        the path, the file is its product, or an edit of it, which the merge tells apart
        (merge.py): each version was judged on its own, and their concatenation may be
        over the limit one version is held to. Before, it is one version, judged so."""
        if self.merge.initialized(relpath):
            return True
        existing = _read(pfd, base, limit=MAX_MERGE)
        return existing is not None and is_text(existing)

    def _identical_text(self, m: Member, pfd: int, base: str, data: bytes) -> None:
        self._merge(m, pfd, base, data, identical=True)

    def _merge(self, m: Member, pfd: int, base: str, data: bytes, *, identical: bool = False) -> None:
        # A run killed between writing the merged file and renaming it left this behind;
        # the merge itself is recorded, so it may not be applied again below.
        tmp = f"{TMP_PREFIX}{self.tag}merge"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=pfd)
        offered: list[bool] = []

        def read_existing() -> tuple[bytes, Meta]:
            st = os.lstat(base, dir_fd=pfd)
            return _read(pfd, base, limit=1 << 30) or b"", Meta(
                st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns
            )

        def apply(content: bytes, meta: Meta) -> None:
            self._merged_temp(pfd, tmp, content, meta, like=base)
            os.rename(tmp, base, src_dir_fd=pfd, dst_dir_fd=pfd)  # the merge replaces on purpose

        def edited(content: bytes, meta: Meta) -> None:
            # The admin changed the file since bootenv merged it: theirs stays, and the
            # merge that would have replaced it is a conflict for them to look at.
            self._merged_temp(pfd, tmp, content, meta, like=base)
            self.conflict(m, pfd, base, tmp, EDITED)
            offered.append(True)

        def review(content: bytes, parts: dict[str, bytes]) -> None:
            # Every component whose version is in the merge, the one that placed the
            # file first included, whatever the order they came in.
            for comp, part in sorted(parts.items()):
                if normalized(part) != normalized(content):
                    self._review(comp, m.name, pfd, base, part)

        mine = Meta(m.mode, m.uid, m.gid, m.mtime_ns)
        changed = self.merge.merge_into(
            m.name,
            self.component,
            data,
            mine,
            read_existing,
            apply,
            identical=identical,
            edited=edited,
            review=review,
        )
        if changed:
            log.info("%s: merged its version of /%s", self.component, m.name)
        if (changed or not identical) and not offered:
            self.stats.merged.append(m.name)

    def _review(self, component: str, relpath: str, pfd: int, base: str, part: bytes) -> None:
        """List the merge at `relpath` for the admin (`bootenv conflicts`, `merged:
        review`), `component`'s version beside it: a concatenation may hold a directive
        twice, which only the admin can settle. Merged, the versions agree with the file
        in place on owner, group, mode and xattrs: the copy gets them."""
        tmp = f"{TMP_PREFIX}{self.tag}review"
        st = os.lstat(base, dir_fd=pfd)
        self._merged_temp(
            pfd, tmp, part, Meta(st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns), like=base
        )
        kept = self._keep_aside(component, relpath, pfd, base, tmp, MERGED)
        if kept is None:
            return
        log.info(
            "%s: /%s is a merge, listed for review; %s's version is in /%s",
            self.component,
            relpath,
            component,
            kept[1],
        )

    def _merged_temp(self, pfd: int, tmp: str, content: bytes, meta: Meta, *, like: str) -> None:
        """Write `content` to `tmp` with `meta` and the xattrs (ACLs) of `like`, the file
        in place: a version is merged only if its own agree with them."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=pfd)
        xattrs = xattrs_of(pfd, like)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        try:
            # What it took from a default ACL of its directory goes first (as in _meta).
            for key in set(xattrs_of(pfd, tmp)) - set(xattrs):
                os.removexattr(fd, key)
            write_all(fd, content)
            if self.privileged:
                os.fchown(fd, meta.uid, meta.gid)
            os.fchmod(fd, meta.mode)
            for key, value in xattrs.items():
                self.setxattr(fd, key, value)
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            os.fsync(fd)  # it replaces a file in place: its data first (merge._atomic_write)
        finally:
            os.close(fd)

    def conflict(self, m: Member, pfd: int, base: str, tmp: str | None, reason: str) -> None:
        kept = self._keep_aside(self.component, m.name, pfd, base, tmp, reason)
        if kept is None:
            return
        cid, store = kept
        if tmp is not None:
            self.placed[m.name] = store
        self.stats.conflicts.append(cid)
        log.warning(
            "%s: conflict on /%s (%s); kept the existing one, yours is in /%s",
            self.component,
            m.name,
            reason,
            store,
        )

    def _keep_aside(
        self, component: str, relpath: str, pfd: int, base: str, tmp: str | None, reason: str
    ) -> tuple[str, str] | None:
        """Move `tmp` (`component`'s version of `relpath`; None: a directory) to the
        conflict store and record it beside the path in place: its id and where it is.
        None if the admin resolved the conflict for this very version (a re-run of the
        component): it is not stored nor reported again, as it is not when a layout
        finds the component done by an earlier run (conflicts.open_ids)."""
        cid = conflict_id(component, relpath)
        store = stored_path(component, relpath)
        # Under the lock a resolve holds: it neither loses this version to a record it
        # writes nor finds its own stored version replaced (resolvetemps.py). A conflict
        # is rare: the lock is taken for each, not for every member.
        (self.root / RECORDS).mkdir(parents=True, exist_ok=True)
        with records_locked(self.root / RECORDS):
            if tmp is not None:
                done = resolved_for(self.root, cid, describe(f"/proc/self/fd/{pfd}/{tmp}"))
                if done is not None:
                    os.unlink(tmp, dir_fd=pfd)
                    log.info(
                        "%s: /%s: conflict %s again, resolved for this version (%s)",
                        component,
                        relpath,
                        cid,
                        done.get("keep"),
                    )
                    return None
            sparent, _, sbase = store.rpartition("/")
            sfd = self.dir_fd(sparent)
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, OSError):
                    os.unlink(sbase, dir_fd=sfd)
                os.rename(tmp, sbase, src_dir_fd=pfd, dst_dir_fd=sfd)
            else:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sbase, 0o755, dir_fd=sfd)
            existing = describe(f"/proc/self/fd/{pfd}/{base}")
            incoming = describe(f"/proc/self/fd/{sfd}/{sbase}")
            if tmp is None and resolved_for(self.root, cid, incoming) is not None:
                return None  # a directory: made again all the same, what it holds goes there (extract.py)
            write_record(self.root, Conflict(cid, component, relpath, reason, existing, incoming, store))
            return cid, store


def _read(pfd: int, name: str, *, limit: int) -> bytes | None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        if os.fstat(fd).st_size > limit:
            return None
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _same(pfd: int, a: str, b: str, sa: os.stat_result, sb: os.stat_result) -> bool:
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a, dir_fd=pfd) == os.readlink(b, dir_fd=pfd)
    if stat.S_ISFIFO(sa.st_mode):
        return True
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if not stat.S_ISREG(sa.st_mode) or sa.st_size != sb.st_size:
        return False
    return _starts(pfd, b, a)


def _differ(pfd: int, a: str, b: str, sa: os.stat_result, sb: os.stat_result, *, owners: bool) -> list[str]:
    """What of owner, group, mode and xattrs (ACLs and file capabilities among them)
    differs between `a` and `b` in `pfd`, not followed. The owner and group count only if
    `owners`: a layout that is not root cannot give a file the archive's."""
    unlike = []
    if owners and sa.st_uid != sb.st_uid:
        unlike.append("owner")
    if owners and sa.st_gid != sb.st_gid:
        unlike.append("group")
    if not stat.S_ISLNK(sa.st_mode) and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        unlike.append("mode")
    if xattrs_of(pfd, a) != xattrs_of(pfd, b):
        unlike.append("xattrs")
    return unlike


def _words(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _cut_short(pfd: int, a: str, b: str, sa: os.stat_result, sb: os.stat_result) -> bool:
    """Whether file `a` in place is file `b` that a power cut cut short. A file is
    renamed into place before its data is on the disk (the layout syncs as it goes, and
    at the end), so a power cut may leave the name, the owner, the mode and the mtime of
    a file this component placed in an earlier run, with its data empty or short (ext4
    writes a size only with the data). Such a file is the incoming one to the nanosecond
    of its mtime, and a strict prefix of it; no other file in place (the OS's, another
    component's, an admin's edit) is both. A sparse file gets its whole size before its
    data, so it could not be told apart this way: its data is synced before its rename
    instead (atfd.write_sparse)."""
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size >= sb.st_size:
        return False
    if (sa.st_mtime_ns, sa.st_mode, sa.st_uid, sa.st_gid) != (
        sb.st_mtime_ns,
        sb.st_mode,
        sb.st_uid,
        sb.st_gid,
    ):
        return False
    return _starts(pfd, b, a)


def _starts(pfd: int, whole: str, part: str) -> bool:
    """Whether file `whole` begins with all of file `part` (both in `pfd`): for files of
    one size, whether they hold the same bytes."""
    fw = os.open(whole, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    fp = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        while x := os.read(fp, 1 << 20):
            if os.read(fw, len(x)) != x:
                return False
        return True
    finally:
        os.close(fw)
        os.close(fp)
