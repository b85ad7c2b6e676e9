"""Shared alternatives groups on disk: read at capture, written into the OS image's
staged tree, and merged into a target when a component is laid out (alternatives.py
says what a shared group is).

Capture: the staged OS tree gets each shared group as the OS alone would have it: the
entry replaced by a new file, the links by new links (staging.py: nothing is written
into a staged file, which is the gold's own inode). Beside them, for each component with
candidates in one, the record of their `Fragment`s: /var/lib/bootenv/alternatives/<component>.
The OS image carries the records, not the components: a component's archive is as it
was, which a layout of an earlier bootenv takes (its extract refuses any other file of
bootenv's own state), and an earlier bootenv ignores the records.

Layout: under dpkg's locks (as its status merge), each group of the component's record
is set to the view of the candidates the target's entry lists and the component's own
that the target has (a component of another image may lack one: update-alternatives
too refuses a candidate that is not there). The target's entry must mean what bootenv
made (the view of the candidates it lists, those the gold does not list kept as they
are) and each link be as that view or the new one has it (a run killed between the two
left some of each); anything else is the admin's doing (update-alternatives --set, a
link made by hand): the group stays as it is, and the layout warns. The links go first,
each a new link renamed over the old one, the entry last, so the entry says what is
done; their temp names are bootenv's, logged for the next layout's sweep (_Temps).
Every directory is reached from the root without following a symlink (atfd.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
from collections.abc import Callable
from pathlib import Path

from bootenv.alternatives import (
    DB_DIR,
    FormatError,
    Fragment,
    Group,
    Shared,
    View,
    dump_fragments,
    links,
    load_fragments,
    meaning,
    parse,
    plan_shared,
    render,
    select,
)
from bootenv.assign import links_of
from bootenv.atfd import TMP_PREFIX, dir_under, exists
from bootenv.dpkg import STATUS
from bootenv.dpkgmerge import dpkg_locked, read_at
from bootenv.errors import FatalError
from bootenv.intree import Readlink, disk_links, resolve
from bootenv.journal import TempLog
from bootenv.paxread import ArchiveError
from bootenv.split import OS, Split
from bootenv.staging import replace_file
from bootenv.walk import Entry, Kind
from bootenv.writeback import replace_at

log = logging.getLogger(__name__)

RECORDS = "/var/lib/bootenv/alternatives"  # in the OS image, one file per component
_GONE = object()


def plan(root: Path, entries: list[Entry], split: Split) -> tuple[Split, tuple[Shared, ...]]:
    """The gold's shared groups, and the split with their paths in the OS (plan_shared).
    An entry that does not parse is named in a warning and left as the split has it."""
    readlink = links_of(entries).get
    db_dir = resolve(DB_DIR, readlink)
    groups: dict[str, Group] = {}
    for e in entries:
        if e.kind is Kind.FILE and posixpath.dirname(e.path) == db_dir:
            name = posixpath.basename(e.path)
            try:
                text = (root / e.path.lstrip("/")).read_bytes().decode("utf-8", "surrogateescape")
                groups[name] = parse(name, text)
            except (OSError, FormatError) as exc:
                log.warning("alternatives %s: not read (%s): it goes where its link goes", name, exc)
    return plan_shared(split, groups, readlink, db_dir)


def write_os_view(staging: Path, shared: tuple[Shared, ...]) -> None:
    """Each shared group in the staged OS tree as the OS alone would have it, and each
    component's record of its candidates in them."""
    for group in shared:
        view = group.os_view()
        assert view is not None  # a shared group has a candidate in the OS
        entry = render(view.group).encode("utf-8", "surrogateescape")
        replace_file(staging, f"{DB_DIR}/{group.gold.name}", entry)
        for link, target in links(group.gold, view).items():
            try:
                if not _set_link(staging, link, target, disk_links(staging)):
                    log.warning("alternatives %s: %s is not a symlink: left as it is", group.gold.name, link)
            except ArchiveError as exc:
                raise FatalError(f"{link} is not written in the staged tree: {exc.message}") from exc
    _write_records(staging, shared)


def _write_records(staging: Path, shared: tuple[Shared, ...]) -> None:
    """RECORDS/<component> in the staged tree (made with its directories: capture leaves
    bootenv's own state out of an image), for each component with a candidate in a
    shared group. Reached as a layout reaches it: from the root, no symlink followed."""
    components = sorted({c for s in shared for c in s.owners.values() if c != OS})
    if not components:
        return
    try:
        made = _make_dirs(staging, RECORDS)
    except ArchiveError as exc:  # a layout refuses such a root before it merges anything
        log.warning("the alternatives records of %s are not written: %s", ", ".join(components), exc.message)
        return
    with dir_under(staging, RECORDS.lstrip("/")) as dfd:
        assert dfd is not None
        for component in components:
            mine = {s.gold.name: s.fragment(component) for s in shared if component in s.owners.values()}
            fd = os.open(
                component,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
            with os.fdopen(fd, "wb") as f:
                f.write(dump_fragments(mine))
    for parent, times in made:  # the gold's directories keep their times
        os.utime(staging / parent, ns=times, follow_symlinks=False)


def _make_dirs(staging: Path, path: str) -> list[tuple[str, tuple[int, int]]]:
    """Make `path`'s missing directories in the staged tree (0755, no symlink followed);
    the existing directories they were made in, with their times before. ArchiveError if
    a symlink is on the way (a gold's /var -> /data/var)."""
    made = []
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        with dir_under(staging, "/".join(parts[:i])) as dfd:  # ArchiveError: a symlink on the way
            if dfd is not None:
                continue
        parent = "/".join(parts[: i - 1])
        st = os.lstat(staging / parent) if parent else os.lstat(staging)
        made.append((parent, (st.st_atime_ns, st.st_mtime_ns)))
        with dir_under(staging, parent) as pfd:
            assert pfd is not None
            os.mkdir(parts[i - 1], 0o755, dir_fd=pfd)
    return made


class _Temps:
    """The temp names of a component's merge: bootenv's (TMP_PREFIX and the component's
    name), each directory logged in the component's TempLog before the first one there,
    so that the next layout, whatever it lays out, removes one a kill left (sweep.py)
    before a merge may leave its group alone. The component reached `files`, which
    removed its log; once the merge is over, every temp renamed, the log goes again."""

    def __init__(self, root: Path, component: str) -> None:
        self.component = component
        self.log = TempLog(root, component)

    def name(self, rel: str, base: str) -> str:
        self.log.note(rel)
        name = f"{TMP_PREFIX}{self.component}~alt~{base}"
        if len(os.fsencode(name)) > 240:  # a long link name: NAME_MAX is 255 bytes
            name = f"{TMP_PREFIX}{self.component}~alt~{hashlib.sha256(os.fsencode(base)).hexdigest()[:16]}"
        return name

    def done(self) -> None:
        if self.log.fd is not None:
            self.log.close()
            self.log.path.unlink(missing_ok=True)


def _set_link(
    root: Path, path: str, target: str | None, readlink: Readlink, temps: _Temps | None = None
) -> bool:
    """Make `path` a symlink to `target` (None: no link), replacing a symlink there; a
    missing directory is left so. A path that is something else stays: False. `temps`:
    the target's (a staged tree's temp needs no sweeping: a killed capture's goes whole)."""
    parent, name = posixpath.split(resolve(path, readlink, last=False))
    with dir_under(root, parent.lstrip("/")) as dfd:
        if dfd is None:
            return True  # no directory to hold it (update-alternatives would fail): left
        now = _readlink(dfd, name)
        if now == target:
            return True
        if now is None and exists(name, dfd):  # a file or a directory: not ours
            return False
        if target is None:
            os.unlink(name, dir_fd=dfd)
        else:
            tmp = f".{name}.bootenv-tmp" if temps is None else temps.name(parent.lstrip("/"), name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            os.symlink(target, tmp, dir_fd=dfd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    return True


def _readlink(dfd: int, name: str) -> str | None:
    """The target of symlink `name`, or None if it is missing or not a symlink."""
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None


def _link_now(root: Path, path: str, readlink: Readlink, views: tuple[str | None, ...]) -> object:
    """What is at `path`: its symlink's target, None if nothing, _GONE for a file that
    is not a symlink (never a view's); one of `views` if it has no directory (left)."""
    parent, name = posixpath.split(resolve(path, readlink, last=False))
    with dir_under(root, parent.lstrip("/")) as dfd:
        if dfd is None:
            return views[0]
        target = _readlink(dfd, name)
        if target is None and exists(name, dfd):
            return _GONE
        return target


def merge_component_alternatives(root: Path, component: str) -> list[str]:
    """Merge `component`'s shared alternatives into ROOT's; return a warning for each
    group left as the admin set it. ArchiveError if a directory on the way, or the
    record, is a symlink; FatalError if the record is damaged."""
    rel = f"{RECORDS}/{component}".lstrip("/")
    src, name = posixpath.split(rel)
    with dir_under(root, src) as sfd:
        data = None if sfd is None else read_at(sfd, name, rel)
    if data is None:
        return []
    try:
        fragments = load_fragments(data)
    except FormatError as exc:
        raise FatalError(f"/{rel}: {exc}") from exc
    warnings: list[str] = []
    temps = _Temps(root, component)
    with dir_under(root, str(STATUS.parent), create=True) as dfd:
        assert dfd is not None
        with dpkg_locked(dfd):
            for group, fragment in sorted(fragments.items()):
                why = _merge_group(root, group, fragment, temps)
                if why:
                    warnings.append(f"alternatives {group} left as they were: {why}")
                    log.warning("%s: %s", component, warnings[-1])
    temps.done()
    return warnings


def _merge_group(root: Path, name: str, fragment: Fragment, temps: _Temps) -> str | None:
    """Set group `name` to the view with the fragment's candidates; why not, if it stays."""
    gold = fragment.gold(name)
    db = DB_DIR.lstrip("/")
    with dir_under(root, db) as dfd:
        current = None if dfd is None else read_at(dfd, name, f"{db}/{name}")
    if current is None:
        return "the target has no entry for them (removed?)"
    text = current.decode("utf-8", "surrogateescape")
    try:
        target = parse(name, text)
    except FormatError as exc:
        return f"the target's entry is not one update-alternatives would read ({exc})"
    listed = {c.path for c in target.choices}
    # update-alternatives rewrites the entry whenever a package's script runs it (nano's
    # postinst, at each upgrade), in its own way: compared by what it means, not bytes.
    old = select(gold, listed, fragment.selected, target)
    if old is None or meaning(old.group) != meaning(target):
        return "the target's entry is not as bootenv left it (changed with update-alternatives --set?)"
    readlink = disk_links(root)
    ours = {p for p in fragment.ours if _link_now(root, p, readlink, (None,)) is not None}  # there
    new = select(gold, listed | ours, fragment.selected, target)
    assert new is not None
    before, after = links(gold, old), links(gold, new)
    for link in after:
        views = (before[link], after[link])
        if _link_now(root, link, readlink, views) not in views:
            return f"{link} is not the link bootenv made (changed by hand?)"
    return _apply(root, name, new, after, readlink, text, temps)


def _apply(
    root: Path,
    name: str,
    new: View,
    after: dict[str, str | None],
    readlink: Callable[[str], str | None],
    text: str,
    temps: _Temps,
) -> str | None:
    for link, target in after.items():
        if not _set_link(root, link, target, readlink, temps):
            return f"{link} is not a symlink"
    data = render(new.group)
    if data != text:
        db = DB_DIR.lstrip("/")
        with dir_under(root, db) as dfd:
            assert dfd is not None
            st = os.lstat(name, dir_fd=dfd)
            # Ending as update-alternatives' own temp files, which it skips when it lists
            # the groups: one a killed run left is not taken for a group.
            tmp = temps.name(db, f"{name}.dpkg-tmp")
            replace_at(dfd, name, data.encode("utf-8", "surrogateescape"), like=st, tmp=tmp)
            os.fsync(dfd)
        log.info("alternatives %s: %s selected (%s)", name, new.selected.path, new.group.mode)
    return None
