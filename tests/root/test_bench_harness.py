"""The benchmarks' scratch filesystem: a fresh ext4 on a sparse file gives the blocks a run
freed back to the host disk before the next run, so a long benchmark cannot fill it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.harness import drop_caches, fresh_ext4
from tests.conftest import require_root, require_tools


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tools("losetup", "mkfs.ext4", "fstrim")


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_fresh_ext4_gives_freed_blocks_back_when_trimmed(tmp_path: Path) -> None:
    backing = tmp_path / "target.fs"
    with fresh_ext4(backing, tmp_path / "mnt", size=1 << 30) as mnt:
        assert os.listdir(mnt) == ["lost+found"]
        base = _allocated(backing)
        data = mnt / "run" / "blob"
        data.parent.mkdir()
        with open(data, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        assert _allocated(backing) >= base + (64 << 20)  # on the host disk, not just cached
        data.unlink()
        drop_caches(trim=data.parent)
        assert _allocated(backing) < base + (8 << 20)
    assert not backing.exists()
    assert not os.path.ismount(tmp_path / "mnt")
