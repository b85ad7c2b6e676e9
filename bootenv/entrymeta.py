"""The metadata a TreeWriter gives each entry it makes: owner, then mode, then xattrs
and ACLs, then mtime, in that order, as each step can undo the one before it (a chown
clears setuid bits and file capabilities). An entry made in a directory with a default
ACL first loses what it inherited, so it ends with the gold's ACLs, or none.

An xattr the filesystem refuses for the archive's sake (its name or value) fails the
layout; one this layout may not set (not root, a filesystem without xattrs) is skipped
with one warning per writer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Protocol

from bootenv.paxread import ArchiveError, Member
from bootenv.xattrs import ACCESS_ACL, DEFAULT_ACL, acl_xattr

log = logging.getLogger(__name__)


class Warned(Protocol):
    """Where a layout's warnings go (extract.Stats)."""

    warnings: list[str]


class MetaSetter:
    """TreeWriter's metadata methods (extract.py): they set what each entry ends with,
    for the writer's component, as root or not."""

    component: str
    privileged: bool
    stats: Warned
    _xattr_warned: bool  # the one warning of an xattr not set is given

    def _meta(
        self, fd: int, m: Member, *, made: os.stat_result | None = None, inherits: bool = False
    ) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (chown clears caps), then
        mtime. `made`: the entry's stat as created; an owner or mode it has already is
        not set again (each a journaled change of its inode, where the fstat only reads
        it). `inherits`: made in a directory with a default ACL; the ACLs it took from it
        go first, before a chmod can widen their mask (the gold's own are set below)."""
        if inherits:
            self._drop_inherited(fd, m)
        chown = self.privileged and (made is None or (made.st_uid, made.st_gid) != (m.uid, m.gid))
        if chown:
            os.fchown(fd, m.uid, m.gid)
        if made is None or stat.S_IMODE(made.st_mode) != m.mode:
            os.fchmod(fd, m.mode)
        if m.xattrs or m.acls:
            for key, value in self._xattrs(m):
                self._setxattr(fd, key, value)
        if m.kind != "dir":
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))

    def _path_meta(self, pfd: int, name: str, m: Member, *, inherits: bool) -> None:
        if inherits and m.kind != "symlink":  # a symlink has no ACL
            self._drop_inherited(f"/proc/self/fd/{pfd}/{name}", m)
        if self.privileged:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if m.kind != "symlink":
            os.chmod(name, m.mode, dir_fd=pfd)
        for key, value in self._xattrs(m):
            self._setxattr(f"/proc/self/fd/{pfd}/{name}", key, value)
        os.utime(name, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _drop_inherited(self, target: int | str, m: Member) -> None:
        """Remove the ACLs a new entry took from its directory's default ACL: it is to
        carry the gold's ACLs, and none where the gold's had none."""
        for key in (ACCESS_ACL, DEFAULT_ACL) if m.kind == "dir" else (ACCESS_ACL,):
            try:
                if isinstance(target, int):
                    os.removexattr(target, key)
                else:
                    os.removexattr(target, key, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise

    def _xattrs(self, m: Member) -> list[tuple[str, bytes]]:
        out = list(m.xattrs)
        for which, text in m.acls:
            if text.strip():
                out.append((f"system.posix_acl_{which}", acl_xattr(text)))
        return out

    def _setxattr(self, target: int | str, key: str, value: bytes) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ERANGE, errno.E2BIG):  # the archive's name or value
                raise ArchiveError(f"xattr {key[:80]!r} refused by the filesystem: {exc.strerror}") from exc
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise
            if not self._xattr_warned:
                self.stats.warnings.append(f"xattr {key} not set: {exc.strerror}")
                log.warning("%s: cannot set xattr %s (%s); continuing", self.component, key, exc.strerror)
                self._xattr_warned = True
