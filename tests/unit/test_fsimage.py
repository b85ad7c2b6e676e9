"""Where capture builds the OS image: the in-memory rule and the scratch file's life."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootenv.fsimage import in_memory, mem_available, scratch_image

GiB = 1 << 30


def test_auto_builds_in_memory_only_when_twice_the_image_fits() -> None:
    assert in_memory("auto", 1 * GiB, 2 * GiB)
    assert not in_memory("auto", 1 * GiB, 2 * GiB - 1)
    assert not in_memory("auto", 1 * GiB, 0)  # MemAvailable unknown: disk
    assert in_memory("memory", 8 * GiB, 0)
    assert not in_memory("disk", 1, 64 * GiB)
    with pytest.raises(ValueError):
        in_memory("tmpfs", 1, 1)


def test_mem_available_reads_meminfo() -> None:
    assert mem_available() > 0  # every Linux since 3.14 has MemAvailable


def test_memory_scratch_is_a_path_others_can_open_and_is_gone_after(tmp_path: Path) -> None:
    fallback = tmp_path / "os.img"
    with scratch_image(fallback, memory=True) as image:
        assert str(image).startswith(f"/proc/{os.getpid()}/fd/")
        with open(image, "wb") as f:  # as mke2fs would: a new open of the path
            f.truncate(1 << 30)
            f.seek(4096)
            f.write(b"ext4")
        with open(image, "rb") as f:
            f.seek(4096)
            assert f.read(4) == b"ext4"
        assert os.stat(image).st_size == 1 << 30
        fd = int(image.name)
    assert not fallback.exists()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the kernel frees the memory


def test_disk_scratch_is_the_fallback_file_and_is_removed(tmp_path: Path) -> None:
    fallback = tmp_path / "os.img"
    with scratch_image(fallback, memory=False) as image:
        assert image == fallback
        image.write_bytes(b"x")
    assert not fallback.exists()
    with pytest.raises(RuntimeError), scratch_image(fallback, memory=False) as image:
        image.write_bytes(b"x")
        raise RuntimeError("mke2fs failed")
    assert not fallback.exists()


def test_an_image_gets_the_inodes_its_tree_needs_and_the_default_density_at_least() -> None:
    from bootenv.fsimage import MiB, inode_count

    size = 668 * MiB  # what image_size_for gives 100 000 files of 100 bytes
    assert inode_count(size, 100_100) >= 100_100 + 11  # mke2fs alone: 42 752 (one per 16 KiB)
    assert inode_count(size, 10) == size // 16384  # a tree of few files: the default density


def test_a_tree_of_many_small_files_fits_its_image(tmp_path: Path, allow_run: None) -> None:
    """mke2fs -d, by the image's size alone, would give this 8 MiB image 2048 inodes (one
    per 4 KiB, as for any image under 512 MiB) and fail: "Could not allocate inode"."""
    from bootenv.fsimage import make_ext4, tree_usage
    from bootenv.run import run

    tree = tmp_path / "tree"
    for d in range(3):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            os.close(os.open(tree / f"d{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    _, inodes = tree_usage(tree)
    image = tmp_path / "os.img"
    make_ext4(tree, image, 8 << 20, inodes)
    run(["e2fsck", "-fn", image])
    listing = run(["debugfs", "-R", "ls -p /d2", image]).stdout.decode()
    assert "/f999/" in listing
