"""An entry's xattrs: POSIX ACLs in the kernel's format, and the xattrs it carries of its own.

An archive names an ACL in GNU tar's text (SCHILY.acl.*, numeric ids: capture uses
them); acl_xattr makes the `system.posix_acl_*` xattr the kernel takes. What is made in
a directory with a default ACL inherits it (has_default_acl), and a layout drops it. An
entry's own xattrs (xattrs_of) leave out the labels the security policy gives it where
it is (LABELS), which no archive ships.
"""

from __future__ import annotations

import contextlib
import errno
import os

from bootenv.paxread import ArchiveError

_ACL_TAGS = {"user": (1, 2), "group": (4, 8), "mask": (0x10, 0x10), "other": (0x20, 0x20)}
ACCESS_ACL = "system.posix_acl_access"
DEFAULT_ACL = "system.posix_acl_default"
# Labels the security policy gives a file where it is, not part of what an archive ships.
LABELS = frozenset({"security.selinux", "security.apparmor", "security.SMACK64"})


def acl_xattr(text: str) -> bytes:
    """SCHILY.acl.* text (`user::rw-,user:1000:r--,...`) to the posix_acl xattr format."""
    entries = []
    for item in text.replace("\n", ",").split(","):
        fields = item.strip().split(":")
        if len(fields) < 3 or fields[0] not in _ACL_TAGS:
            continue
        tag_obj, tag_named = _ACL_TAGS[fields[0]]
        # isdigit() alone accepts "²", which int() refuses; ids are 32-bit.
        qual = fields[3] if len(fields) > 3 and _is_id(fields[3]) else fields[1]
        perm = sum(bit for ch, bit in zip(fields[2][:3], (4, 2, 1), strict=False) if ch != "-")
        if qual and not _is_id(qual):
            raise ArchiveError(f"ACL names a user by name or a bad id ({qual[:40]}); capture uses ids")
        tag, ident = (tag_named, int(qual)) if qual else (tag_obj, 0xFFFFFFFF)
        entries.append((tag, ident, perm))
    out = (2).to_bytes(4, "little")
    for tag, ident, perm in sorted(entries):
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) < 0xFFFFFFFF


def has_default_acl(fd: int) -> bool:
    """Whether directory `fd` has a default ACL (a filesystem without ACLs has none)."""
    try:
        os.getxattr(fd, DEFAULT_ACL)
    except OSError as exc:
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP)  # unsure: drop what may be inherited
    return True


def xattrs_of(pfd: int, name: str) -> dict[str, bytes]:
    path = f"/proc/self/fd/{pfd}/{name}"
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for key in keys:
        if key not in LABELS:
            with contextlib.suppress(OSError):  # gone, or not readable by a layout that is not root
                out[key] = os.getxattr(path, key, follow_symlinks=False)
    return out
