"""The benchmarks' scratch filesystem: a fresh ext4 on a sparse file gives the blocks a run
freed back to the host disk before the next run, so a long benchmark cannot fill it; and a
disk image is mounted through a loop device that does direct I/O to it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.harness import direct_loop, drop_caches, fresh_ext4, mounted
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


def test_a_disk_image_is_mounted_through_a_direct_io_loop_device(tmp_path: Path) -> None:
    """split-vs-single lays out into the disk file write-os wrote: through one page cache
    (the mounted filesystem's), not a second one of the disk file's."""
    require_tools("mke2fs")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", str(disk)], check=True)
    with direct_loop(disk) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        assert Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip() == "1"
        (mnt / "f").write_bytes(b"laid out")
    assert not os.path.ismount(tmp_path / "mnt")
    assert (
        f"{dev}:" not in subprocess.run(["losetup", "-a"], check=True, capture_output=True, text=True).stdout
    )
    listing = subprocess.run(["debugfs", "-R", "cat /f", str(disk)], capture_output=True, check=True)
    assert listing.stdout == b"laid out"
