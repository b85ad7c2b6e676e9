"""Writeback advice: the flusher syncs the filesystem as it goes, and stops when closed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bootenv import writeback
from bootenv.writeback import Flusher


class CountingSyncfs:
    """The real syncfs, counted, with the directory each call was for."""

    def __init__(self) -> None:
        self.real = writeback._syncfs()
        self.calls: list[tuple[str, int]] = []
        self.third = threading.Event()

    def __call__(self, fd: int) -> int:
        rc = int(self.real(fd))
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), rc))
        if len(self.calls) >= 3:
            self.third.set()
        return rc


def test_the_flusher_syncs_the_filesystem_of_its_path_until_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingSyncfs()
    monkeypatch.setattr(writeback, "_syncfs", lambda: counting)
    (tmp_path / "f").write_bytes(b"x" * 65536)  # something for the syncs to write out
    before = set(os.listdir("/proc/self/fd"))
    with Flusher(tmp_path, interval=0.01):
        assert counting.third.wait(10), "the flusher did not sync three times in 10 s"
    after_close = len(counting.calls)
    time.sleep(0.1)
    assert len(counting.calls) == after_close  # no sync once closed
    assert {(str(tmp_path), 0)} == set(counting.calls)  # each one of tmp_path's fs, and it worked
    assert set(os.listdir("/proc/self/fd")) == before  # its directory fd is closed


def test_a_file_is_synced_through_a_description_of_the_flushers_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, str, int]] = []
    third = threading.Event()
    real = writeback._fdatasync

    def fdatasync(fd: int) -> int:
        synced.append((fd, os.readlink(f"/proc/self/fd/{fd}"), real(fd)))
        if len(synced) >= 3:
            third.set()
        return synced[-1][2]

    monkeypatch.setattr(writeback, "_fdatasync", fdatasync)
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.write(b"x" * 65536)
        with Flusher(f"/proc/self/fd/{f.fileno()}", interval=0.01):
            assert third.wait(10), "the flusher did not sync three times in 10 s"
        # Its own description: a write error it is told of is still the owner's to see.
        assert {(path, rc) for _, path, rc in synced} == {(str(target), 0)}
        assert f.fileno() not in {fd for fd, _, _ in synced}


def test_closing_twice_and_a_path_it_cannot_open(tmp_path: Path) -> None:
    flusher = Flusher(tmp_path, interval=60)
    assert flusher.running
    flusher.close()
    flusher.close()
    assert not flusher.running
    with Flusher(tmp_path / "missing") as missing:  # advice only: no flusher, no error
        assert not missing.running
