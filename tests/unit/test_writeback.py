"""Writeback advice: the flusher syncs as it goes, keeps the first error, stops when closed."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootenv import journal, writeback
from bootenv.writeback import Flusher


class Counting:
    """A sync function, counted: the path each call was for and what it returned."""

    def __init__(self, real: Callable[[int], None], fail: int | None = None) -> None:
        self.real, self.fail = real, fail
        self.calls: list[tuple[int, str]] = []
        self.third = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        if len(self.calls) >= 3:
            self.third.set()
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        self.real(fd)


def _closed(fd: int, path: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") != path
    except FileNotFoundError:
        return True


def test_a_directory_is_synced_as_a_filesystem_until_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(writeback.sync_filesystem)
    monkeypatch.setattr(writeback, "sync_filesystem", counting)
    (tmp_path / "f").write_bytes(b"x" * 65536)  # something for the syncs to write out
    with Flusher(tmp_path, interval=0.01) as flusher:
        assert flusher.running
        assert counting.third.wait(10), "the flusher did not sync three times in 10 s"
    fd = counting.calls[0][0]
    assert {path for _, path in counting.calls} == {str(tmp_path)}
    assert not flusher.running and flusher.error is None
    flusher.check()  # nothing failed
    assert _closed(fd, str(tmp_path))


def test_a_file_is_synced_through_a_description_of_the_flushers_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(os.fdatasync)
    monkeypatch.setattr(writeback.os, "fdatasync", counting)
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.write(b"x" * 65536)
        with Flusher(f"/proc/self/fd/{f.fileno()}", interval=0.01):
            assert counting.third.wait(10), "the flusher did not sync three times in 10 s"
        # Its own description: an error it is told of is still the owner's to see.
        assert {path for _, path in counting.calls} == {str(target)}
        assert f.fileno() not in {fd for fd, _ in counting.calls}


def test_the_first_error_is_kept_for_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(writeback.sync_filesystem, fail=errno.EIO)
    monkeypatch.setattr(writeback, "sync_filesystem", counting)
    with Flusher(tmp_path, interval=0.01) as flusher:
        assert counting.third.wait(10), "the flusher did not sync three times in 10 s"
    assert flusher.error is not None and flusher.error.errno == errno.EIO
    with pytest.raises(OSError, match=f"writing to {tmp_path} failed: Input/output error"):
        flusher.check()


def test_check_syncs_now_so_an_error_just_made_is_not_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another description (a stream's final syncfs) may have been told of the error
    # first; the flusher's older one is told too, at its next sync: check() makes it now.
    counting = Counting(writeback.sync_filesystem)
    monkeypatch.setattr(writeback, "sync_filesystem", counting)
    with Flusher(tmp_path, interval=3600) as flusher:
        flusher.check()  # a sync, and it worked
        assert len(counting.calls) == 1
        counting.fail = errno.EIO
        with pytest.raises(OSError, match="Input/output error"):
            flusher.check()
        assert len(counting.calls) == 2
    with pytest.raises(OSError, match="Input/output error"):
        flusher.check()  # closed: no sync, the error it kept
    assert len(counting.calls) == 2


def test_closing_twice_and_a_path_it_cannot_open(tmp_path: Path) -> None:
    flusher = Flusher(tmp_path, interval=60)
    assert flusher.running
    flusher.close()
    flusher.close()
    assert not flusher.running
    with Flusher(tmp_path / "missing") as missing:  # advice only: no flusher, no error
        assert not missing.running
    missing.check()


def test_the_journals_syncfs_reports_a_write_error_and_falls_back_only_without_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    monkeypatch.setattr(journal.os, "sync", lambda: synced.append("sync"))
    journal.syncfs(tmp_path)  # the real one: works here
    for err in (errno.EIO, errno.ENOSYS):

        def failing(fd: int, err: int = err) -> None:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(journal, "sync_filesystem", failing)
        if err == errno.EIO:
            with pytest.raises(OSError, match="Input/output error"):
                journal.syncfs(tmp_path)
        else:
            journal.syncfs(tmp_path)
    assert synced == ["sync"]  # only for the kernel without syncfs


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_replace_at_keeps_the_owner_and_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "status"
    target.write_bytes(b"old\n")
    target.chmod(0o640)
    like = target.lstat()
    dfd = _dir_fd(tmp_path)
    try:
        writeback.replace_at(dfd, "status", b"new\n", like=like, tmp=".status.tmp")
    finally:
        os.close(dfd)
    st = target.lstat()
    assert target.read_bytes() == b"new\n"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, like.st_uid, like.st_gid)
    assert st.st_ino != like.st_ino  # a new file renamed over it, not the old one rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status"]


def test_replace_at_removes_a_leftover_temp_name_without_writing_through_it(tmp_path: Path) -> None:
    """A killed run's temp name may be a hard link to, or a symlink at, a file that must
    not change: it is unlinked, never opened."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.link(precious, tmp_path / "a" / ".t")
    os.symlink(precious, tmp_path / "b" / ".t")
    for sub in ("a", "b"):
        dfd = _dir_fd(tmp_path / sub)
        try:
            writeback.replace_at(dfd, "f", b"data\n", like=None, tmp=".t")
        finally:
            os.close(dfd)
        assert (tmp_path / sub / "f").read_bytes() == b"data\n"
        assert not (tmp_path / sub / ".t").exists()
    assert precious.read_bytes() == b"keep me\n"


def test_replace_at_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "status"
    target.write_bytes(b"old\n")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writeback.os, "write", full)
    dfd = _dir_fd(tmp_path)
    try:
        with pytest.raises(OSError, match="No space"):
            writeback.replace_at(dfd, "status", b"new\n", like=target.lstat(), tmp=".status.tmp")
    finally:
        os.close(dfd)
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status"]


@pytest.mark.parametrize("relative", [False, True], ids=["path", "dir_fd"])
def test_new_file_cut_short_mid_write_leaves_no_temp_file(
    relative: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_write = os.write

    def full_after_one(fd: int, data: bytes) -> int:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(writeback.os, "write", full_after_one)
    dfd = _dir_fd(tmp_path)
    try:
        with (
            pytest.raises(OSError, match="No space"),
            writeback.new_file(
                ".t" if relative else tmp_path / ".t", 0o644, dir_fd=dfd if relative else None
            ) as fd,
        ):
            writeback.write_all(fd, b"first")
            writeback.write_all(fd, b"second")
    finally:
        os.close(dfd)
    assert len(written) == 1  # the file had its first write when the second failed
    assert os.listdir(tmp_path) == []


def test_new_file_whose_fsync_fails_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writeback.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"), writeback.new_file(tmp_path / ".t", 0o644) as fd:
        writeback.write_all(fd, b"data")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_new_file_removes_a_leftover_link_and_never_writes_through_it(link: str, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me\n")
    precious.chmod(0o600)
    tmp = tmp_path / "out" / ".t"
    tmp.parent.mkdir()
    (os.link if link == "hard" else os.symlink)(precious, tmp)
    with writeback.new_file(tmp, 0o644) as fd:
        writeback.write_all(fd, b"new\n")
    assert not tmp.is_symlink() and tmp.read_bytes() == b"new\n"
    assert tmp.stat().st_ino != precious.stat().st_ino
    assert precious.read_bytes() == b"keep me\n"
    assert (precious.stat().st_mode & 0o777, precious.stat().st_nlink) == (0o600, 1)


def test_new_file_refuses_a_file_made_between_its_unlink_and_its_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_EXCL: another writer's file that appears at the name is not taken over."""
    real_unlink = os.unlink

    def unlink_then_race(path: object, *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)  # type: ignore[arg-type]
        os.symlink(tmp_path / "elsewhere", tmp_path / ".t")

    (tmp_path / ".t").write_bytes(b"left over")
    monkeypatch.setattr(writeback.os, "unlink", unlink_then_race)
    with pytest.raises(FileExistsError), writeback.new_file(tmp_path / ".t", 0o644):
        pytest.fail("the block ran")
    monkeypatch.undo()
    assert not (tmp_path / "elsewhere").exists()  # the symlink was not followed
    assert (tmp_path / ".t").is_symlink()  # and it is not ours to remove


def test_replace_dir_swaps_in_the_new_files_with_the_old_directorys_mode_and_owner(tmp_path: Path) -> None:
    final = tmp_path / "boot"
    final.mkdir(mode=0o750)
    final.chmod(0o750)
    (final / "vmlinuz").write_bytes(b"old")
    if os.geteuid() == 0:
        os.chown(final, 1234, 5678)
    before = final.stat()
    with writeback.replace_dir(final) as new:
        assert new.parent == tmp_path and os.listdir(new) == []
        (new / "vmlinuz").write_bytes(b"new")
        assert (final / "vmlinuz").read_bytes() == b"old"  # nothing changes until the block ends
    after = final.stat()
    assert (final / "vmlinuz").read_bytes() == b"new" and os.listdir(tmp_path) == ["boot"]
    assert after.st_ino != before.st_ino
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_replace_dir_whose_block_fails_leaves_the_old_directory(tmp_path: Path) -> None:
    final = tmp_path / "boot"
    final.mkdir()
    (final / "vmlinuz").write_bytes(b"old")
    with pytest.raises(OSError, match="No space"), writeback.replace_dir(final) as new:
        (new / "vmlinuz").write_bytes(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == ["boot"] and os.listdir(final) == ["vmlinuz"]
    assert (final / "vmlinuz").read_bytes() == b"old"


def test_replace_dir_makes_a_missing_directory(tmp_path: Path) -> None:
    with writeback.replace_dir(tmp_path / "a/b") as new:
        (new / "f").write_bytes(b"x")
    assert (tmp_path / "a/b/f").read_bytes() == b"x" and os.listdir(tmp_path / "a") == ["b"]


def test_replace_dir_keeps_a_symlink_and_replaces_where_it_leads(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real/f").write_bytes(b"old")
    (tmp_path / "link").symlink_to("real")
    with writeback.replace_dir(tmp_path / "link") as new:
        (new / "f").write_bytes(b"new")
    assert (tmp_path / "link").readlink() == Path("real")
    assert (tmp_path / "real/f").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_replace_dir_removes_a_leftover_link_without_following_it(tmp_path: Path) -> None:
    """A killed run's `.NAME.new` may be a symlink someone planted: it goes, and the
    directory it leads to stays as it was."""
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/f").write_bytes(b"keep me")
    (tmp_path / "boot").mkdir()
    (tmp_path / ".boot.new").symlink_to("precious")
    with writeback.replace_dir(tmp_path / "boot") as new:
        assert not new.is_symlink() and os.listdir(new) == []
        (new / "f").write_bytes(b"new")
    assert os.listdir(tmp_path / "precious") == ["f"] and (tmp_path / "precious/f").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["boot", "precious"]


def test_replace_dir_without_a_swap_puts_the_old_directory_back_if_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem cannot swap two names (NFS: EINVAL) it renames them in turn."""

    def unsupported(*args: object) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    real_rename = os.rename

    def second_fails(src: str, dst: str, **kwargs: Any) -> None:
        if src.endswith(".new"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst, **kwargs)

    final = tmp_path / "boot"
    final.mkdir()
    (final / "f").write_bytes(b"old")
    monkeypatch.setattr(writeback, "exchange_at", unsupported)
    monkeypatch.setattr(writeback.os, "rename", second_fails)
    with pytest.raises(OSError, match="Input/output"), writeback.replace_dir(final) as new:
        (new / "f").write_bytes(b"new")
    assert os.listdir(tmp_path) == ["boot"] and (final / "f").read_bytes() == b"old"
    monkeypatch.setattr(writeback.os, "rename", real_rename)
    with writeback.replace_dir(final) as new:
        (new / "f").write_bytes(b"new")
    assert os.listdir(tmp_path) == ["boot"] and (final / "f").read_bytes() == b"new"
