"""ACLs in the kernel's xattr format, from an archive's text."""

from __future__ import annotations

from bootenv.xattrs import acl_xattr


def test_acl_text_to_xattr() -> None:
    value = acl_xattr("user::rw-,user:1000:rwx,group::r--,mask::rwx,other::r--")
    assert value[:4] == (2).to_bytes(4, "little") and len(value) == 4 + 5 * 8
    assert (1000).to_bytes(4, "little") in value
