"""The layout gives each entry exactly the gold's POSIX ACLs and mode: it reads an ACL
from its xattr (numeric ids) before GNU tar's text, and an entry made in a directory
with a default ACL keeps nothing it inherited from it.

ACLs are the kernel's `system.posix_acl_*` xattrs, built by acl_xattr; the tests are
skipped on a filesystem without ACLs."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bootenv import extract
from bootenv.extract import TreeWriter
from bootenv.merge import MergeState
from bootenv.paxread import ArchiveError, PaxReader
from bootenv.xattrs import acl_xattr
from tests.hostile.kit import d, f, special, tar_bytes

ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
NAMED = acl_xattr("user::rw-,user:33:r--,group::r--,mask::r--,other::r--")
INHERITED = acl_xattr("user::rwx,user:4242:r-x,group::r-x,group:4343:rwx,mask::rwx,other::---")


def _pax(ti: tarfile.TarInfo, **records: bytes | str) -> tarfile.TarInfo:
    """Pax records as GNU tar writes them; a binary value (an xattr) kept byte for byte."""
    ti.pax_headers = {
        **ti.pax_headers,
        **{k: os.fsdecode(v) if isinstance(v, bytes) else v for k, v in records.items()},
    }
    return ti


def _lay_out(root: Path, members: list[tarfile.TarInfo]) -> None:
    writer = TreeWriter(root, "db", privileged=os.geteuid() == 0, merge=MergeState(root))
    try:
        reader = PaxReader(io.BytesIO(tar_bytes(members)))
        for m in reader:
            writer.place(m, reader)
        writer.finish()
    finally:
        writer.close()


def _acls(path: Path) -> dict[str, bytes]:
    return {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith("system.posix_acl_")}


@pytest.fixture
def acl_fs(tmp_path: Path) -> Path:
    """tmp_path, if its filesystem takes POSIX ACLs."""
    try:
        os.setxattr(tmp_path, DEFAULT, INHERITED)
        os.removexattr(tmp_path, DEFAULT)
    except OSError as exc:
        pytest.skip(f"this filesystem takes no ACL: {exc.strerror}")
    return tmp_path


# -- reading: the xattr before the text ----------------------------------------------


def test_an_acl_is_read_from_its_xattr_not_from_tars_text() -> None:
    """GNU tar with --acls wrote an ACL twice: as text naming the capturing host's user
    (www-data for uid 33) and as the xattr, with the id. Only a text with no xattr
    beside it is an ACL to convert."""
    both = {"SCHILY.acl.access": "user::rw-\nuser:www-data:r--\ngroup::r--\nmask::r--\nother::r--\n"}
    members = [
        _pax(f("both", "x"), **both, **{f"SCHILY.xattr.{ACCESS}": NAMED}),
        _pax(
            f("text", "x"), **{"SCHILY.acl.access": "user::rw-,user:33:r--,group::r--,mask::r--,other::r--"}
        ),
        _pax(
            d("dir"),
            **{"SCHILY.acl.access": "user::rwx,group::r-x,other::r-x"},
            **{f"SCHILY.xattr.{DEFAULT}": NAMED},
        ),
    ]
    got = {m.name: (m.acls, m.xattrs) for m in PaxReader(io.BytesIO(tar_bytes(members)))}
    assert got["both"] == ((), ((ACCESS, NAMED),))
    assert got["text"] == ((("access", "user::rw-,user:33:r--,group::r--,mask::r--,other::r--"),), ())
    assert got["dir"] == ((("access", "user::rwx,group::r-x,other::r-x"),), ((DEFAULT, NAMED),))


def test_a_component_captured_with_tars_acl_text_lays_out(acl_fs: Path) -> None:
    """Images captured before capture dropped --acls name users in the text: they lay
    out, with the ACL the xattr holds."""
    text = "user::rw-\nuser:www-data:r--\ngroup::r--\nmask::r--\nother::r--\n"
    _lay_out(
        acl_fs,
        [
            d("etc"),
            _pax(f("etc/web.conf", "x"), **{"SCHILY.acl.access": text, f"SCHILY.xattr.{ACCESS}": NAMED}),
        ],
    )
    assert _acls(acl_fs / "etc/web.conf") == {ACCESS: NAMED}


def test_an_acl_text_naming_a_user_with_no_xattr_is_still_refused(acl_fs: Path) -> None:
    with pytest.raises(ArchiveError, match="names a user by name"):
        _lay_out(
            acl_fs,
            [
                _pax(
                    f("x", "x"),
                    **{"SCHILY.acl.access": "user::rw-,user:www-data:r--,group::r--,mask::r--,other::---"},
                )
            ],
        )


# -- writing: nothing inherited from a default ACL -----------------------------------


def test_an_entry_made_under_a_default_acl_has_exactly_the_golds_acls_and_mode(acl_fs: Path) -> None:
    """The gold's data directory has a default ACL; a file in it without an ACL (made
    before the default ACL was set, or cleared) must not get one on the target, nor a
    group entry the default ACL masks (0660: group rw- where the default says r-x)."""
    own = acl_xattr("user::rw-,user:5000:r--,group::r--,mask::r--,other::---")
    members = [
        _pax(d("data", mode=0o750), **{f"SCHILY.xattr.{DEFAULT}": INHERITED}),
        f("data/plain", "p", mode=0o640),
        f("data/shared", "s", mode=0o660),
        f("data/public", "q", mode=0o644),
        _pax(f("data/own", "o", mode=0o640), **{f"SCHILY.xattr.{ACCESS}": own}),
        d("data/sub", mode=0o755),
        f("data/sub/deeper", "d", mode=0o644),
        _pax(
            d("data/kept", mode=0o770),
            **{f"SCHILY.xattr.{ACCESS}": INHERITED, f"SCHILY.xattr.{DEFAULT}": INHERITED},
        ),
        special("data/pipe", tarfile.FIFOTYPE),
    ]
    _lay_out(acl_fs, members)
    got = {
        name: (os.lstat(acl_fs / name).st_mode & 0o7777, _acls(acl_fs / name))
        for name in (
            "data",
            "data/plain",
            "data/shared",
            "data/public",
            "data/own",
            "data/sub",
            "data/sub/deeper",
            "data/kept",
            "data/pipe",
        )
    }
    assert got == {
        "data": (0o750, {DEFAULT: INHERITED}),
        "data/plain": (0o640, {}),
        "data/shared": (0o660, {}),
        "data/public": (0o644, {}),
        "data/own": (0o640, {ACCESS: own}),
        "data/sub": (0o755, {}),
        "data/sub/deeper": (0o644, {}),
        "data/kept": (0o770, {ACCESS: INHERITED, DEFAULT: INHERITED}),
        "data/pipe": (0o660, {}),
    }


def test_a_file_laid_in_a_target_directory_with_a_default_acl_inherits_nothing(acl_fs: Path) -> None:
    """A directory the target has already (the OS's journal directory, say) keeps its
    default ACL; the component's files in it still get only their own ACLs."""
    (acl_fs / "var/log/journal").mkdir(parents=True)
    os.setxattr(acl_fs / "var/log/journal", DEFAULT, INHERITED)
    _lay_out(acl_fs, [d("var"), d("var/log"), d("var/log/journal"), f("var/log/journal/x", "x", mode=0o640)])
    assert _acls(acl_fs / "var/log/journal") == {DEFAULT: INHERITED}
    assert (os.lstat(acl_fs / "var/log/journal/x").st_mode & 0o7777, _acls(acl_fs / "var/log/journal/x")) == (
        0o640,
        {},
    )


def test_a_file_being_written_under_a_default_acl_grants_nobody_anything(
    acl_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its metadata is set a file is root's. Made 0644 under a default ACL it had
    the ACL's named users and groups, masked only to r--: they could open it while its
    data went in. Made 0600, its mask is --- (the mode's group bits are the mask)."""
    seen = []
    real = extract.write_all

    def spy(fd: int, data: Any) -> None:
        seen.append(os.fstat(fd).st_mode & 0o077)
        real(fd, data)

    monkeypatch.setattr(extract, "write_all", spy)
    _lay_out(
        acl_fs,
        [_pax(d("data"), **{f"SCHILY.xattr.{DEFAULT}": INHERITED}), f("data/public", "q" * 100, mode=0o644)],
    )
    assert seen == [0]
    assert (os.lstat(acl_fs / "data/public").st_mode & 0o7777, _acls(acl_fs / "data/public")) == (0o644, {})


def test_directories_without_a_default_acl_cost_no_xattr_call_per_file(
    acl_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layout is bound by files per second: whether a directory has a default ACL
    is asked once per directory, never per file."""
    calls: list[str] = []
    for name in ("getxattr", "removexattr", "listxattr"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1]
        )
    dirs = [d("a"), d("a/b"), d("c")]
    files = [
        f(f"{p}/f{i}", "x", mode=mode)
        for p in ("a", "a/b", "c")
        for i, mode in enumerate((0o644, 0o640, 0o600) * 10)
    ]
    _lay_out(acl_fs, dirs + files)
    assert len(calls) <= 1 + len(dirs)  # the root, and each directory the files are in
