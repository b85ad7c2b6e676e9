"""Lay out one component archive into a root directory, safely and crash-safely.

Every path is reached from the root through directory file descriptors opened with
O_NOFOLLOW, one component at a time (atfd.py), so no symlink (planted by the archive or
already in the tree) can redirect a write. Every entry is built under a temp name in its
final directory, gets its owner, mode, xattrs and mtime (entrymeta.py), and is then
renamed into place with RENAME_NOREPLACE: a kill -9 leaves either nothing or the
finished entry, and a path someone else already took is never overwritten
(sharedpaths.py decides what happens instead, by the shared-path rule in merge.py).
Directories are created the same way, so a directory that exists is complete; whose
owner, group and mode one that several components ship keeps is decided by name, not
by which stream came first (shareddirs.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bootenv import shareddirs
from bootenv.atfd import (
    DIR_FLAGS,
    TMP_PREFIX,
    exists,
    fresh,
    open_child,
    open_dir,
    rename_noreplace,
    renamed,
    safe_to_create,
    write_sparse,
)
from bootenv.conflicts import stored_path
from bootenv.entrymeta import MetaSetter
from bootenv.journal import DirLog, TempLog
from bootenv.merge import MergeState, is_candidate
from bootenv.paxread import ArchiveError, Member, PaxReader
from bootenv.shareddirs import Found, Owner
from bootenv.sharedpaths import SharedPaths
from bootenv.writeback import write_all
from bootenv.xattrs import DEFAULT_ACL, LABELS, has_default_acl, xattrs_of

log = logging.getLogger(__name__)

OWN = "var/lib/bootenv"
_OWN_DIR = OWN + "/"
MAX_OPEN_DIRS = 256
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    identical: int = 0
    merged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class TreeWriter(MetaSetter):
    """Places the members of one component's archive under `root`."""

    def __init__(
        self,
        root: Path,
        component: str,
        *,
        privileged: bool,
        merge: MergeState,
        piece: int = 0,
        redirect: tuple[str, ...] = (),
        dirs: DirLog | None = None,
        temps: TempLog | None = None,
    ) -> None:
        self.root = root
        self.component = component
        # Pieces (chunks) of one component are laid out by parallel streams: their temp
        # names must differ. Piece 0 holds every directory; later pieces make none.
        self.piece = piece
        self._tag = f"{component}~" if piece == 0 else f"{component}~{piece}."
        self.privileged = privileged
        self.merge = merge
        self.root_fd = os.open(root, DIR_FLAGS)
        self._dirs: dict[str, int] = {}
        # The open directories with a default ACL (by their _dirs name): what is made in
        # them inherits it, and is made so as to grant nobody anything until it has the
        # gold's own ACLs (or none). Asked once per directory opened, not per file.
        self._acl_dirs: set[str] = {""} if has_default_acl(self.root_fd) else set()
        # Directories in place whose xattrs _shared_dir listed, not yet opened: whether
        # they have a default ACL is known, not asked again.
        self._acl_listed: dict[str, bool] = {}
        self._retired: list[int] = []  # evicted from _dirs, closed once the member is placed
        self._seen: set[str] = set()
        self._placed: dict[str, str] = {}  # hardlink targets: name -> where it is now
        # The directories made (by earlier, killed runs too: `dirs` logs them), by the
        # name they have: in the conflict store for those inside a conflicting directory.
        self._dirs_log = dirs
        self._created_dirs: list[tuple[str, int]] = list(dirs.earlier) if dirs else []
        self._redirect = set(redirect)  # dirs that conflicted: their contents go to the store
        # Where this writer makes temp names, logged before the first in each directory:
        # the next layout removes those a kill left there (sweep.py).
        self._temps = temps
        self._index = 0
        self._xattr_warned = False
        self._records: shareddirs.Records | None = None  # opened by the first directory made
        self.stats: Stats = Stats()  # (MetaSetter needs only its warnings)

    def close(self) -> None:
        self._close_retired()
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._records is not None:
            os.close(self._records.fd)
        os.close(self.root_fd)

    # -- directories -------------------------------------------------------------
    def dir_fd(self, rel: str, *, create: bool = True) -> int:
        """An fd of directory `rel` (relative to the root), never through a symlink."""
        if rel == "":
            return self.root_fd
        if rel in self._dirs:
            return self._dirs[rel]
        parent, _, name = rel.rpartition("/")
        fd = open_child(self.dir_fd(parent, create=create), name, rel, create=create)
        listed = self._acl_listed.pop(rel, None)
        if has_default_acl(fd) if listed is None else listed:
            self._acl_dirs.add(rel)
        else:
            self._acl_dirs.discard(rel)
        if len(self._dirs) >= MAX_OPEN_DIRS:
            # Closed only once the member being placed is: its caller may hold one of
            # them (a hardlink's directory and its target's, a conflict's store).
            self._retired.extend(self._dirs.values())
            self._dirs.clear()
        self._dirs[rel] = fd
        return fd

    def _close_retired(self) -> None:
        while self._retired:
            os.close(self._retired.pop())

    # -- members -----------------------------------------------------------------
    def place(self, m: Member, reader: PaxReader) -> None:
        try:
            self._place(m, reader)
        finally:
            self._close_retired()

    def _place(self, m: Member, reader: PaxReader) -> None:
        self._index += 1
        if m.name == "":
            return  # the root directory itself keeps the target's metadata
        self._check(m)
        if m.name in self._seen:
            self.stats.warnings.append(f"duplicate entry /{m.name} skipped")
            log.warning("%s: duplicate archive entry /%s skipped", self.component, m.name)
            return
        self._seen.add(m.name)
        if m.kind in ("chr", "blk") and not self.privileged:
            self.stats.warnings.append(f"device node /{m.name} skipped (not root)")
            log.warning("%s: not root, device node /%s skipped", self.component, m.name)
            return
        parent, _, base = m.name.rpartition("/")
        if self._redirect and any(parent == d or parent.startswith(d + "/") for d in self._redirect):
            self._place_at(m, reader, f"{stored_path(self.component, parent)}", base, store=True)
            return
        self._place_at(m, reader, parent, base, store=False)

    def _check(self, m: Member) -> None:
        base = m.name.rpartition("/")[2]
        if base.startswith(TMP_PREFIX):
            raise ArchiveError(f"refused: /{m.name} uses bootenv's temp-file prefix")
        if m.name == OWN or m.name.startswith(_OWN_DIR):
            allowed = (OWN, f"{OWN}/dpkg", f"{OWN}/dpkg/{self.component}.status")
            if m.name not in allowed:
                raise ArchiveError(f"refused: /{m.name} is bootenv's own state")
        if m.kind == "hardlink" and m.linkname not in self._placed:
            raise ArchiveError(f"refused: hardlink /{m.name} -> /{m.linkname} outside this archive")
        if m.kind == "dir" and self.piece > 0:
            raise ArchiveError(f"refused: directory /{m.name} outside the archive's first chunk")

    def _place_at(self, m: Member, reader: PaxReader, parent: str, base: str, *, store: bool) -> None:
        pfd = self.dir_fd(parent)
        tmp = f"{TMP_PREFIX}{self._tag}{self._index}"
        if self._temps is not None:  # the merged and review temps (sharedpaths.py) go there too
            self._temps.note(parent)
        if m.kind == "dir":
            self._make_dir(m, pfd, tmp, base, parent, store=store)
            return
        data = None
        if m.kind == "file" and m.sparse is None and m.name.startswith("etc/") and m.size <= 1 << 20:
            data = reader.read_all()
            if not store and is_candidate(m.name, data) and not exists(base, pfd):
                self.merge.mark(m.name, self.component, data, placed=True)
        moved = False  # once the temp name is renamed, there is nothing to clean up
        try:
            self._make(m, reader, pfd, tmp, data, inherits=parent in self._acl_dirs)
            if store:
                os.rename(tmp, base, src_dir_fd=pfd, dst_dir_fd=pfd)
                moved = True
                self._placed[m.name] = f"{parent}/{base}"  # a hardlink to it goes there too
                return
            try:
                rename_noreplace(pfd, tmp, pfd, base)
                moved = True
                self._placed[m.name] = m.name
                self.stats.files += 1
                self.stats.bytes += m.size
            except FileExistsError:
                self._shared_paths().place(m, pfd, tmp, base, data)
        finally:
            if not moved:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=pfd)

    def _make_dir(self, m: Member, pfd: int, tmp: str, base: str, parent: str, *, store: bool) -> None:
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                # Directories merge; whose metadata the directory keeps is decided by
                # name, not by which stream came first (shareddirs.py). A run killed
                # between making this member's temp and renaming it left the temp (empty:
                # nothing goes in before the rename), and another stream made the
                # directory since: clear the temp here, or nothing would.
                with contextlib.suppress(OSError):
                    os.rmdir(tmp, dir_fd=pfd)
                if not store:
                    self._shared_dir(m, pfd, base, st)
                return
            if store:
                return
            self._shared_paths().conflict(m, pfd, base, None, "a directory where something else is")
            self._redirect.add(m.name)
            return
        fresh(pfd, tmp, lambda: os.mkdir(tmp, 0o700, dir_fd=pfd))
        fd = os.open(tmp, DIR_FLAGS, dir_fd=pfd)
        try:
            self._meta(fd, m, inherits=parent in self._acl_dirs)
        finally:
            os.close(fd)
        if not self._put_dir(m, pfd, tmp, base, store=store):
            os.rmdir(tmp, dir_fd=pfd)  # another stream made it first
            self._make_dir(m, pfd, tmp, base, parent, store=store)
            return
        made = (f"{parent}/{base}" if parent else base, m.mtime_ns)
        self._created_dirs.append(made)
        if self._dirs_log is not None:
            self._dirs_log.add(*made)

    def _put_dir(self, m: Member, pfd: int, tmp: str, base: str, *, store: bool) -> bool:
        """Rename the directory made as `tmp` into place; False if the name is taken. Its
        record, naming this component, comes first (shareddirs.py)."""
        if store:  # the conflict store's: this component's alone
            return renamed(pfd, tmp, base)
        records = self._dir_records()
        with records.locked():
            if exists(base, pfd):
                return False
            records.write(m.name, self.component, Found.at(pfd, tmp, xattrs=bool(m.xattrs or m.acls)))
            return renamed(pfd, tmp, base)

    def _shared_dir(self, m: Member, pfd: int, base: str, st: os.stat_result) -> None:
        """This component's directory is in place already: it keeps its metadata, or
        takes this component's if bootenv made it for one that sorts after this one."""
        records = self._dir_records()
        rec = records.read(m.name)  # none (the OS's directory): no lock needed
        found = None
        if rec is not None:
            with records.locked():
                rec = records.read(m.name)
                found = Found.at(pfd, base)
                if shareddirs.takes_over(self.component, rec, found):
                    self._take_dir(m, pfd, base)
                    records.write(m.name, self.component, Found.at(pfd, base))
                    return
        current = Owner.of(st) if found is None else found.owner
        mine = Owner(m.mode, m.uid, m.gid) if self.privileged else Owner(m.mode, current.uid, current.gid)
        if mine != current:
            whose = f"{rec.maker}'s" if rec is not None and rec.owner == current else "its"
            what = (
                f"directory /{m.name} keeps {whose} owner and mode ({current}), not this component's ({mine})"
            )
            self.stats.warnings.append(what)
            log.warning("%s: %s", self.component, what)
        kept = shareddirs.xattrs_kept(m.name, rec, found)  # an admin's default ACL
        if kept := kept or self._other_xattrs(m, pfd, base, rec, found):
            self.stats.warnings.append(kept)
            log.warning("%s: %s", self.component, kept)

    def _other_xattrs(
        self, m: Member, pfd: int, base: str, rec: shareddirs.Record | None, found: Found | None
    ) -> str | None:
        """The warning for a component whose xattrs the directory in place does not have.
        Found with no record (the OS's), its xattrs' names are listed, in the one call that
        also answers dir_fd's question, and their values read only if this member has some."""
        mine = shareddirs.comparable(dict(self._xattrs(m)), privileged=self.privileged)
        if found is not None:  # with a record, unchanged since it was made: its maker's
            whose, have = (f"{rec.maker}'s" if rec is not None else "its"), found.xattrs
        else:
            names = shareddirs.xattr_names(pfd, base)
            if names is not None and m.name not in self._dirs:
                self._acl_listed[m.name] = DEFAULT_ACL in names
            # Against none of its own, the names alone say whether they differ.
            whose, have = "its", xattrs_of(pfd, base) if names and mine else dict.fromkeys(names or (), b"")
        return shareddirs.xattrs_differ(
            m.name, whose, shareddirs.comparable(have, privileged=self.privileged), mine
        )

    def _take_dir(self, m: Member, pfd: int, base: str) -> None:
        """Give directory `base` this member's owner, mode and xattrs, and no others."""
        fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        try:
            keep = {key for key, _ in self._xattrs(m)} | LABELS
            for key in set(xattrs_of(fd, ".")) - keep:
                with contextlib.suppress(OSError):  # one a layout that is not root may not remove
                    os.removexattr(fd, key)
            self._meta(fd, m)
            if has_default_acl(fd):  # what entries made in it take (dir_fd asks it once)
                self._acl_dirs.add(m.name)
            else:
                self._acl_dirs.discard(m.name)
        finally:
            os.close(fd)

    def _shared_paths(self) -> SharedPaths:
        """What places a member whose name is taken. Made for each, not kept: it holds this
        writer's methods, a cycle that would outlive the writer until a garbage collection."""
        return SharedPaths(
            root=self.root,
            component=self.component,
            tag=self._tag,
            privileged=self.privileged,
            merge=self.merge,
            stats=self.stats,
            placed=self._placed,
            dir_fd=self.dir_fd,
            setxattr=self._setxattr,
        )

    def _dir_records(self) -> shareddirs.Records:
        if self._records is None:
            self._records = shareddirs.Records(open_dir(self.root_fd, str(shareddirs.RECORDS), create=True))
        return self._records

    def _make(
        self, m: Member, reader: PaxReader, pfd: int, tmp: str, data: bytes | None, *, inherits: bool
    ) -> None:
        """Make entry `m` as `tmp` in `pfd`, with its data and metadata. `inherits`: `pfd`
        has a default ACL, which the new entry takes (its mode masked by it too)."""
        if m.kind == "file":
            # Under a default ACL a file made 0600 has a mask of ---: the named users and
            # groups it inherits get nothing while its data goes in.
            mode = m.mode if safe_to_create(m.mode) and not inherits else 0o600
            fd = fresh(pfd, tmp, lambda: os.open(tmp, _NEW_FILE, mode, dir_fd=pfd))
            try:
                if data is not None:
                    write_all(fd, data)
                elif m.sparse is not None:
                    write_sparse(fd, reader, m)
                else:
                    for chunk in reader.chunks():
                        write_all(fd, chunk)
                # No writeback is started here: the layout's Flusher syncs the filesystem
                # as it goes, on a thread of its own. Started per file on this thread as
                # well (sync_file_range), it made a layout of web 3-6% slower.
                self._meta(fd, m, made=os.fstat(fd), inherits=inherits)
            finally:
                os.close(fd)
            return
        if m.kind == "symlink":
            fresh(pfd, tmp, lambda: os.symlink(m.linkname, tmp, dir_fd=pfd))
        elif m.kind == "hardlink":
            src_parent, _, src_base = self._placed[m.linkname].rpartition("/")
            sfd = self.dir_fd(src_parent)
            fresh(
                pfd,
                tmp,
                lambda: os.link(src_base, tmp, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False),
            )
            return  # a hardlink shares its target's metadata
        elif m.kind == "fifo":
            fresh(pfd, tmp, lambda: os.mkfifo(tmp, 0o600, dir_fd=pfd))
        else:
            kind = stat.S_IFCHR if m.kind == "chr" else stat.S_IFBLK
            fresh(pfd, tmp, lambda: os.mknod(tmp, kind | 0o600, os.makedev(*m.rdev), dir_fd=pfd))
        self._path_meta(pfd, tmp, m, inherits=inherits)

    @property
    def created_dirs(self) -> list[tuple[str, int]]:
        """The directories this writer made, with the mtimes they should end with."""
        return list(self._created_dirs)

    @property
    def redirected(self) -> tuple[str, ...]:
        return tuple(sorted(self._redirect))

    def finish(self, created: list[tuple[str, int]] | None = None) -> None:
        """Directory mtimes last: laying out their contents changed them. `created`:
        the directories of the component's first piece, once every piece is in."""
        for name, mtime in reversed(self._created_dirs if created is None else created):
            parent, _, base = name.rpartition("/")
            # One a killed run made may have been replaced since (by a symlink, even).
            with contextlib.suppress(OSError, ArchiveError):
                os.utime(
                    base, ns=(mtime, mtime), dir_fd=self.dir_fd(parent, create=False), follow_symlinks=False
                )
            self._close_retired()
