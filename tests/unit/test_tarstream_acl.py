"""POSIX ACLs through real GNU tar: capture records them by numeric id only, and both
the layout and the staging copy give each entry exactly the gold's ACLs.

ACLs are set as the kernel's `system.posix_acl_*` xattrs, built by hand (acl_xattr), so
the tests need no setfacl; they are skipped on a filesystem without ACLs."""

from __future__ import annotations

import io
import os
import pwd
from pathlib import Path

import pytest

from bootenv.extract import TreeWriter
from bootenv.merge import MergeState
from bootenv.paxread import PaxReader
from bootenv.tarstream import finish_create, tar_create, tar_extract, write_list
from bootenv.xattrs import acl_xattr

ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


def _named_uid() -> int:
    """A uid this host's passwd names, other than root's if it can: GNU tar's `--acls`
    wrote such a uid as its name, `--numeric-owner` or not."""
    named = sorted(p.pw_uid for p in pwd.getpwall())
    return next((uid for uid in named if uid != 0), 0)


def _acls(path: Path) -> dict[str, bytes]:
    return {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith("system.posix_acl_")}


def _gold(root: Path) -> list[str]:
    """A tree with ACLs naming a named uid, an unnamed one and a group, and a file
    without an ACL in a directory with a default ACL; its paths, parents first."""
    uid = _named_uid()
    (root / "srv/shared").mkdir(parents=True)
    (root / "srv/named").write_text("named")
    (root / "srv/shared/plain").write_text("plain")
    try:
        os.setxattr(
            root / "srv/named",
            ACCESS,
            acl_xattr(
                f"user::rw-,user:{uid}:r--,user:4242:rw-,group::r--,group:4343:r--,mask::rw-,other::---"
            ),
        )
        os.setxattr(
            root / "srv/shared",
            DEFAULT,
            acl_xattr(f"user::rwx,user:{uid}:r-x,group::r-x,mask::r-x,other::---"),
        )
    except OSError as exc:
        pytest.skip(f"this filesystem takes no ACL: {exc.strerror}")
    os.chmod(root / "srv/shared/plain", 0o640)  # made before the default ACL: it has none
    return ["/", "/srv", "/srv/named", "/srv/shared", "/srv/shared/plain"]


def _capture(root: Path, paths: list[str], listing: Path) -> bytes:
    write_list(listing, paths)
    tar = tar_create(root, listing)
    data = tar.stdout.read()
    tar.stdout.close()
    assert finish_create(tar) == ()
    return data


def _expected(gold: Path, paths: list[str]) -> dict[str, tuple[int, dict[str, bytes]]]:
    return {p: (os.lstat(gold / p.lstrip("/")).st_mode, _acls(gold / p.lstrip("/"))) for p in paths}


def test_capture_records_acls_by_id_and_the_layout_sets_them_exactly(tmp_path: Path, allow_run: None) -> None:
    """`tar --acls` wrote `user:www-data:r--` for uid 33 (the capturing host's name for
    it), which every layout then refused; the xattrs carry the ids."""
    gold, target = tmp_path / "gold", tmp_path / "target"
    paths = _gold(gold)
    archive = _capture(gold, paths, tmp_path / "list")
    assert b"SCHILY.acl." not in archive
    assert b"SCHILY.xattr.system.posix_acl_access=" in archive
    target.mkdir()
    writer = TreeWriter(target, "web", privileged=os.geteuid() == 0, merge=MergeState(target))
    try:
        reader = PaxReader(io.BytesIO(archive))
        for m in reader:
            writer.place(m, reader)
        writer.finish()
    finally:
        writer.close()
    assert _expected(target, paths[1:]) == _expected(gold, paths[1:])
    assert _acls(target / "srv/shared/plain") == {}


def test_the_staging_copy_keeps_acls_exactly(tmp_path: Path, allow_run: None) -> None:
    """tar -c | tar -x, as staging copies a tree it cannot hard-link. Extracting with
    `--acls` set each ACL again after its xattr, from the text tar no longer writes:
    from the mode then, which dropped every ACL."""
    gold, staging = tmp_path / "gold", tmp_path / "staging"
    paths = _gold(gold)
    staging.mkdir()
    write_list(tmp_path / "list", paths)
    src = tar_create(gold, tmp_path / "list")
    dst = tar_extract(staging, stdin=src.stdout.fileno())
    src.stdout.close()
    dst.wait_ok()
    assert finish_create(src) == ()
    assert _expected(staging, paths[1:]) == _expected(gold, paths[1:])
