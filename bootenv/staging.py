"""Stage a subset of a tree in a directory, for `mke2fs -d`.

Fast path: a hard-link farm (same filesystem, root): files are links to the gold's own
inodes, so owners, modes, xattrs and mtimes are exact and no data is copied; only
directories are created, with the gold's metadata. NOTHING may write into a staged
file: replace it (write a new file, rename over the link) so the gold is never touched.
Fallback (another filesystem, a read-only snapshot, not root): a GNU tar copy.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from bootenv.atfd import dir_under
from bootenv.errors import FatalError
from bootenv.fsimage import BLOCK_SIZE, tree_usage
from bootenv.intree import disk_links, resolve
from bootenv.paxread import ArchiveError
from bootenv.tarstream import finish_create, tar_create, tar_extract, write_list
from bootenv.walk import GONE
from bootenv.writeback import replace_at

log = logging.getLogger(__name__)

_FALLBACK = (errno.EXDEV, errno.EROFS, errno.EPERM, errno.EACCES, errno.EMLINK)


@dataclass(frozen=True)
class Staged:
    method: str  # "hard links" or "tar copy"
    used: int  # bytes the tree allocates (fsimage.tree_usage)
    inodes: int
    vanished: tuple[str, ...] = ()  # listed, but removed before they were staged (live /)


def stage(root: Path, paths: list[str], staging: Path, work: Path) -> Staged:
    """Populate `staging` with `paths` (sorted, parents first); say how, and its usage.
    A path a live machine removed since it was listed is left out, and named."""
    try:
        return _link_farm(root, paths, staging)
    except OSError as exc:
        if exc.errno not in _FALLBACK:
            raise
        log.info("Hard-link staging not possible (%s); copying with tar", exc.strerror)
    _clear(staging)
    listing = work / f"{staging.name}.list"
    write_list(listing, paths)
    src = tar_create(root, listing)
    dst = tar_extract(staging, stdin=src.stdout.fileno())
    src.stdout.close()
    dst.wait_ok()
    vanished = finish_create(src)
    return Staged("tar copy", *tree_usage(staging), vanished)


def _link_farm(root: Path, paths: list[str], staging: Path) -> Staged:
    """Link every file, make every directory; count the tree's usage as tree_usage()
    does, from the stats the links needed anyway (no second walk)."""
    src_root = str(root)
    dst_root = str(staging)
    dirs: list[str] = []
    seen: set[tuple[int, int]] = set()
    vanished: list[str] = []
    used = 0
    for path in paths:
        if path == "/":
            dirs.append(path)
            continue
        try:
            st = os.lstat(src_root + path)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst_root + path, 0o700)
                dirs.append(path)
            else:
                os.link(src_root + path, dst_root + path, follow_symlinks=False)
        except OSError as exc:
            # Gone from the gold (or its staged parent is): left out. EEXIST is not
            # caught: the list names no path twice.
            if exc.errno not in GONE:
                raise
            vanished.append(path)
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            used += max(st.st_blocks * 512, BLOCK_SIZE)
    # Directory metadata last, deepest first, so creating children doesn't bump mtimes.
    for path in reversed(dirs):
        rel = "" if path == "/" else path
        try:
            _copy_dir_meta(src_root + rel, dst_root + rel)
        except OSError as exc:
            if exc.errno not in GONE or not rel:
                raise
            # Removed from the gold after it was staged: left out if it is empty (its
            # files went with it), else kept for what was linked into it, mode 0700.
            try:
                os.rmdir(dst_root + rel)
                vanished.append(path)
            except OSError:
                log.warning("%s vanished from the gold while it was staged; kept, mode 0700", path)
    return Staged("hard links", used, len(seen), tuple(vanished))


def replace_file(staging: Path, path: str, data: bytes) -> None:
    """Replace the staged file `path` (its symlinks resolved inside the staged tree, as the
    target will resolve them) by a new file holding `data`, with the old one's owner,
    mode and times. Every directory on the way is opened without following a symlink:
    a link staged as it was on the gold (an absolute /var -> /data/var) would lead the
    write out of the staged tree, onto the gold itself or the host."""
    where = resolve(path, disk_links(staging))
    parent, name = posixpath.split(where)
    try:
        with dir_under(staging, parent.lstrip("/")) as dfd:
            if dfd is None:
                raise FatalError(f"{path} vanished from the staged tree")
            _replace_in(dfd, name, data, where)
    except ArchiveError as exc:
        raise FatalError(f"{path} is not written in the staged tree: {exc.message}") from exc


def _replace_in(dfd: int, name: str, data: bytes, where: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError as exc:
        raise FatalError(f"{where} vanished from the staged tree") from exc
    if not stat.S_ISREG(st.st_mode):
        raise FatalError(f"refused: {where} in the staged tree is not a regular file (a symlink?)")
    parent = os.fstat(dfd)
    replace_at(dfd, name, data, like=st, tmp=f".{name}.bootenv")
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
    os.utime(dfd, ns=(parent.st_atime_ns, parent.st_mtime_ns))


def _copy_dir_meta(src: str, dst: str) -> None:
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _clear(staging: Path) -> None:
    import shutil

    shutil.rmtree(staging)
    staging.mkdir()
