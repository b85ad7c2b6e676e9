"""The scan reads the tree through directory fds: a path of any length inside the gold,
a live machine removing entries meanwhile, never a symlink followed."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from bootenv.errors import FatalError
from bootenv.walk import Entry, Kind, brief, exists_in, scan


def small_tree(root: Path) -> None:
    for d in ("etc/app", "var/cache/tmpdir", "var/log"):
        (root / d).mkdir(parents=True)
    for f in ("etc/app/keep.conf", "etc/app/gone.conf", "var/cache/tmpdir/x", "var/log/syslog"):
        (root / f).write_text(f)
    os.symlink("keep.conf", root / "etc/app/link")


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_scan_leaves_out_what_is_removed_while_a_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removed after its directory was listed and before it was looked at: a file, a
    symlink (its readlink) and a directory (its own listing) are left out."""
    root = tmp_path / "gold"
    small_tree(root)
    real = os.scandir

    def scandir(fd: Any) -> Any:
        path = _path_of(fd)
        if path == f"{root}/var/cache/tmpdir":  # opened, then gone before it is listed
            os.unlink(f"{path}/x")
            os.rmdir(path)
        it = real(fd)
        if path == f"{root}/etc/app":
            with it:
                listed = list(it)
            (root / "etc/app/gone.conf").unlink()
            (root / "etc/app/link").unlink()
            return _Listed(listed)
        return it

    monkeypatch.setattr(os, "scandir", scandir)
    got = {(e.path, e.kind) for e in scan(root)}
    monkeypatch.undo()
    assert ("/etc/app/keep.conf", Kind.FILE) in got and ("/var/log/syslog", Kind.FILE) in got
    assert not {p for p, _ in got} & {"/etc/app/gone.conf", "/etc/app/link", "/var/cache/tmpdir/x"}
    # The directory was seen before it went: the packing will find it gone.
    assert ("/var/cache/tmpdir", Kind.DIR) in got


class _Listed:
    """What os.scandir returns, of entries already read."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self.entries = entries

    def __enter__(self) -> list[os.DirEntry[str]]:
        return self.entries

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_scan_that_cannot_read_a_directory_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "gold"
    small_tree(root)
    real = os.scandir

    def scandir(fd: Any) -> Any:
        if _path_of(fd) == f"{root}/var/log":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FatalError, match=rf"^{root}/var/log: Permission denied$"):
        scan(root)


def long_path(top: Path, rel: str = "") -> str:
    """A directory chain below `rel` of `top` (16 directories of 252 bytes), with a file
    `leaf` (4 bytes) and a symlink `link` to it at its end: the chain's path in the tree,
    about 4,080 bytes, valid on the gold and longer than PATH_MAX with ROOT in front."""
    fd = os.open(top / rel.lstrip("/"), os.O_RDONLY | os.O_DIRECTORY)
    path = rel
    try:
        for i in range(16):
            name = f"{i:02d}" + "d" * 250
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, path = sub, f"{path}/{name}"
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
        os.symlink("leaf", "link", dir_fd=fd)
    finally:
        os.close(fd)
    return path


def test_a_path_longer_than_path_max_with_root_in_front_is_scanned(tmp_path: Path) -> None:
    root = tmp_path / "gold"
    root.mkdir()
    deep = long_path(root)
    assert len(os.fsencode(f"{root}{deep}/leaf")) > 4096
    entries = {e.path: e for e in scan(root)}
    assert entries[f"{deep}/leaf"] == Entry(f"{deep}/leaf", Kind.FILE, size=4)
    assert entries[f"{deep}/link"] == Entry(f"{deep}/link", Kind.SYMLINK, target="leaf")
    assert exists_in(root, f"{deep}/leaf")


def test_a_tree_deeper_than_the_open_files_allowed_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "gold"
    small_tree(root)
    real = os.open

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "tmpdir":
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(FatalError, match=rf"^{root}/var/cache/tmpdir: too deep to scan: .*ulimit -n"):
        scan(root)


def test_a_long_path_is_named_shortened_in_one_line() -> None:
    path = "/srv/" + "x" * 300 + "/\n" + "y" * 300
    shown = brief(path)
    assert "\n" not in shown and len(shown) < 160 and shown.endswith(f"({len(path)} bytes)")
    assert brief("/etc/new\nline") == "/etc/new\\nline"


def test_existence_in_the_tree_never_follows_a_link_onto_the_host(tmp_path: Path) -> None:
    """The gold's absolute link names a directory that is on the host, not in the gold."""
    host = tmp_path / "host-only"
    (host / "data").mkdir(parents=True)
    root = tmp_path / "gold"
    (root / "srv").mkdir(parents=True)
    os.symlink(str(host), root / "srv/link")
    assert os.path.lexists(root / "srv/link/data")  # what the host sees, following it
    assert not exists_in(root, "/srv/link/data")
    assert exists_in(root, "/srv/link") and exists_in(root, "/srv") and exists_in(root, "/")
