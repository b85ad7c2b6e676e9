"""The filesystems mounted below ROOT, which capture does not descend into (it stays on
ROOT's filesystem, like `tar --one-file-system`): what it tells the admin about them,
the directory each one hides, and the kernel an OS image must not lose to one (a gold's
/boot on its own partition)."""

from __future__ import annotations

import ctypes
import logging
import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bootenv.assign import claim_paths, links_of
from bootenv.errors import FatalError, UserError
from bootenv.exclude import Exclusions
from bootenv.handoff import find_kernel
from bootenv.intree import disk_links, resolve
from bootenv.split import ComponentSpec
from bootenv.target import ESP_MOUNT
from bootenv.walk import NOFOLLOW_DIR, Entry, Kind, brief

log = logging.getLogger(__name__)


def skipped_mounts(
    specs: tuple[ComponentSpec, ...], entries: list[Entry], exclusions: Exclusions
) -> list[str]:
    """Warnings: a component's `/PATH` that is, or holds, a mount point (the admin named it
    for its contents); any other mount point holding what the capture would take (not
    /proc's contents, excluded anyway, nor the ESP's: a target gets its own)."""
    out = []
    mounts = [e for e in entries if e.mountpoint]
    readlink = links_of(entries).get
    claimed: set[str] = set()
    for spec in specs:
        for path in spec.paths:
            for at in claim_paths(path, readlink):
                inside = [m.path for m in mounts if m.path == at or m.path.startswith(at.rstrip("/") + "/")]
                claimed.update(inside)
                if inside:
                    out.append(
                        f"component {spec.name}: {inside[0]} is a mount point: its contents are on another "
                        "filesystem and are not captured (capture stays on ROOT's filesystem)"
                    )
    rules = exclusions.in_tree(lambda p: resolve(p, readlink))
    for mount in mounts:
        held = [e.path for e in mount.mounted if rules.reason(e.path, e.kind is Kind.DIR) is None]
        if mount.path in claimed or mount.path == ESP_MOUNT or not held:
            continue
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        out.append(
            f"{brief(mount.path)} is a mount point: what is mounted there ({brief(held[0])}{more}) is on "
            "another filesystem and is not captured (capture stays on ROOT's filesystem)"
        )
    return out


@dataclass(frozen=True)
class DirMeta:
    """A directory's owner, mode, times and extended attributes (ACLs among them)."""

    uid: int
    gid: int
    mode: int  # permission bits, setgid and sticky included
    atime_ns: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]


_OPEN_TREE = 428  # open_tree(2): the same number on every architecture (Linux 5.2)
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100


def hidden_dirs(root: Path, paths: Iterable[str]) -> dict[str, DirMeta] | None:
    """The metadata of the directories of ROOT's filesystem that the mounts on `paths`
    (mount points the scan found) hide, the gold's own /boot under a mounted /boot: a
    clone of ROOT's mount without the mounts on it shows them. The clone is detached
    (open_tree(2)): it is mounted nowhere, and goes with its fd. None where that is not
    possible: not root (EPERM), a kernel before 5.2 (ENOSYS). A path that cannot be
    read there is left out."""
    wanted = list(paths)
    if not wanted:
        return {}
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    tree = syscall(
        ctypes.c_long(_OPEN_TREE),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(root)),
        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    if tree < 0:
        log.debug("open_tree(%s): %s", root, os.strerror(ctypes.get_errno()))
        return None
    try:
        out = {}
        for path in wanted:
            meta = _dir_meta(tree, path)
            if meta is not None:
                out[path] = meta
        return out
    finally:
        os.close(tree)


def _dir_meta(top: int, path: str) -> DirMeta | None:
    fd = os.dup(top)
    try:
        for part in [p for p in path.split("/") if p]:
            sub = os.open(part, NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
        st = os.fstat(fd)
        xattrs = tuple((name, os.getxattr(fd, name)) for name in sorted(os.listxattr(fd)))
        return DirMeta(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns, xattrs)
    except OSError as exc:
        log.debug("the directory under the mount on %s: %s", path, exc.strerror)
        return None
    finally:
        os.close(fd)


def restore_hidden(root: Path, staging: Path, mount_points: list[str]) -> None:
    """Give each staged mount point the metadata of the gold's own directory there, the
    one the mount hides (a tmpfs on /boot has mode 1777; the gold's /boot, 0755), where
    capture can see it (hidden_dirs: as root); else it keeps the mounted root's."""
    if not mount_points:
        return
    hidden = hidden_dirs(root, mount_points)
    if hidden is None:
        log.info(
            "The directories under the mount points (%s) cannot be read here (not root?): "
            "the image has the mounted filesystems' root directories' owners and modes",
            ", ".join(brief(m) for m in mount_points),
        )
        return
    for path, meta in hidden.items():
        _set_dir_meta(f"{staging}{path}", meta)


def _set_dir_meta(staged: str, meta: DirMeta) -> None:
    """As staging copies a directory's metadata: owner, mode, xattrs (ACLs), times."""
    os.chown(staged, meta.uid, meta.gid, follow_symlinks=False)
    os.chmod(staged, meta.mode)
    wanted = dict(meta.xattrs)
    for name in os.listxattr(staged, follow_symlinks=False):
        if name not in wanted:
            os.removexattr(staged, name, follow_symlinks=False)
    for name, value in meta.xattrs:
        os.setxattr(staged, name, value, follow_symlinks=False)
    os.utime(staged, ns=(meta.atime_ns, meta.mtime_ns), follow_symlinks=False)


def check_kernel(root: Path, staging: Path, mounts: tuple[Entry, ...]) -> None:
    """Refuse an OS image with no kernel to boot (as the agent finds it: handoff's
    find_kernel, on the staged tree) when the gold's is on a filesystem mounted on, or
    above, its /boot, which capture does not descend into: a target would be wiped and
    written, then fail at hand-off. A gold with no kernel at all (a container's tree)
    is only warned about."""
    links = disk_links(staging)
    boot = resolve("/boot", links)
    if posixpath.basename(boot) != "boot":
        return  # /boot links to another name: find_kernel's own root/boot would follow it
    try:
        find_kernel(staging / posixpath.dirname(boot).lstrip("/"))
        return
    except FatalError as exc:
        missing = exc.message
    hiding = [m.path for m in mounts if m.mounted and (boot == m.path or boot.startswith(m.path + "/"))]
    if not hiding:
        log.warning("%s: a target provisioned with this image will not boot", missing)
        return
    where = hiding[0]
    gold = f"{str(root).rstrip('/')}{where}"
    raise UserError(
        f"{missing}: {where} is a mount point, and capture stays on ROOT's filesystem",
        hint=f"put its files on ROOT's own filesystem and capture that: mount --bind {root} /mnt/gold; "
        f"cp -a {gold}/. /mnt/gold{where}/; bootenv capture /mnt/gold ...",
    )
