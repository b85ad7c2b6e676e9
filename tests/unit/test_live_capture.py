"""A live gold machine changes while capture reads it: a path removed between the scan
and the packing is left out and named; any other failure to read still fails."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bootenv.errors import FatalError
from bootenv.fsimage import tree_usage
from bootenv.staging import _link_farm
from bootenv.tarstream import finish_create, sort_warnings, unquote
from tests.unit.test_walk import small_tree

# What GNU tar 1.34 writes with --ignore-failed-read in the C locale, for a listed file
# that was gone, one whose parent directory was replaced by a file, one named with a
# colon and a backslash, one it could not open, one whose extended attributes it could
# not list (as before: not a failure), and one that changed as it read it (exit 1).
TAR_ERR = """\
tar: ./var/log/gone.log: Warning: Cannot stat: No such file or directory
tar: ./var/tmp/was-a-dir/x: Warning: Cannot stat: Not a directory
tar: ./etc/odd\\: back\\\\slash: Warning: Cannot open: No such file or directory
/usr/bin/tar: ./etc/secret: Warning: Cannot open: Permission denied
tar: ./srv/nfs: Warning: Cannot llistxattrat: Operation not supported
tar: ./var/lib/db/ibdata1: file changed as we read it
"""


def test_tar_warnings_sort_vanished_paths_from_failures_to_read() -> None:
    vanished, failed, notes = sort_warnings(TAR_ERR)
    assert vanished == ["/var/log/gone.log", "/var/tmp/was-a-dir/x", "/etc/odd: back\\slash"]
    assert failed == ["/etc/secret: Cannot open: Permission denied"]
    assert notes == [
        "tar: ./srv/nfs: Warning: Cannot llistxattrat: Operation not supported",
        "tar: ./var/lib/db/ibdata1: file changed as we read it",
    ]
    assert sort_warnings("") == ([], [], [])


class _Finished:
    """What finish_create waits on: a tar that has ended with `code` and wrote `err`."""

    def __init__(self, err: str, code: int = 0) -> None:
        self.err, self.code = err, code

    def wait_ok(self, ok_codes: tuple[int, ...] = (0,)) -> str:
        assert self.code in ok_codes
        return self.err


def test_a_vanished_path_is_returned_and_a_change_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    err = "".join(line + "\n" for line in TAR_ERR.splitlines() if "Permission" not in line)
    with caplog.at_level(logging.WARNING):
        got = finish_create(_Finished(err, code=1))  # type: ignore[arg-type]
    assert got == ("/var/log/gone.log", "/var/tmp/was-a-dir/x", "/etc/odd: back\\slash")
    assert [r.getMessage() for r in caplog.records] == [
        "tar: ./srv/nfs: Warning: Cannot llistxattrat: Operation not supported",
        "tar: ./var/lib/db/ibdata1: file changed as we read it",
    ]


def test_a_file_tar_could_not_read_fails_the_capture() -> None:
    with pytest.raises(FatalError, match=r"tar could not read /etc/secret: Cannot open: Permission denied$"):
        finish_create(_Finished(TAR_ERR))  # type: ignore[arg-type]
    for err, what in [
        (
            "./var/lib/db/ibdata1: Warning: Read error at byte 0, while reading 512 bytes: I/O error",
            "Read error",
        ),
        ("./var/spool: Warning: Cannot savedir: Input/output error", "Cannot savedir"),
        ("./var/lib/db/sparse: Warning: Cannot seek to 4096: Input/output error", "Cannot seek to 4096"),
    ]:
        with pytest.raises(FatalError, match=f"^tar could not read /.*: {what}"):
            finish_create(_Finished(f"tar: {err}\n"))  # type: ignore[arg-type]


def test_names_come_back_as_tar_quoted_them() -> None:
    """What tar 1.34 printed (LC_ALL=C) for names with a colon, a backslash, UTF-8 and
    control characters."""
    assert [
        unquote(q) for q in (r"./a\: Warning\: b", r"./back\\slash", r"./caf\303\251", r"./new\nline")
    ] == [
        "./a: Warning: b",
        "./back\\slash",
        "./café",
        "./new\nline",
    ]
    assert unquote(r"./raw\377") == "./raw" + os.fsdecode(b"\xff")


def test_staging_leaves_out_what_was_removed_since_the_scan(tmp_path: Path) -> None:
    """The hard-link farm, for paths listed but gone: a file, and a directory with its
    file. The rest is staged; the gone ones are named, and not in the staged tree."""
    root = tmp_path / "gold"
    small_tree(root)
    paths = ["/", *sorted("/" + str(p.relative_to(root)) for p in root.rglob("*"))]
    (root / "etc/app/gone.conf").unlink()
    shutil.rmtree(root / "var/cache/tmpdir")
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = _link_farm(root, paths, staging)
    assert staged.vanished == ("/etc/app/gone.conf", "/var/cache/tmpdir", "/var/cache/tmpdir/x")
    assert (staging / "etc/app/keep.conf").read_text() == "etc/app/keep.conf"
    assert os.readlink(staging / "etc/app/link") == "keep.conf"
    assert not (staging / "etc/app/gone.conf").exists() and not (staging / "var/cache/tmpdir").exists()
    assert (staging / "var/cache").is_dir()
    assert (staged.used, staged.inodes) == tree_usage(staging)


def test_a_directory_removed_after_it_was_staged_is_left_out_when_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "gold"
    small_tree(root)
    (root / "var/cache/tmpdir/x").unlink()
    paths = ["/", *sorted("/" + str(p.relative_to(root)) for p in root.rglob("*"))]
    staging = tmp_path / "staging"
    staging.mkdir()
    real_link = os.link

    def link(src: str, dst: str, **kw: Any) -> None:  # the last file staged: the gold's tmpdir goes
        real_link(src, dst, **kw)
        if dst.endswith("/var/log/syslog"):
            (root / "var/cache/tmpdir").rmdir()

    monkeypatch.setattr(os, "link", link)
    staged = _link_farm(root, paths, staging)
    assert staged.vanished == ("/var/cache/tmpdir",)
    assert not (staging / "var/cache/tmpdir").exists() and (staging / "var/log/syslog").exists()
