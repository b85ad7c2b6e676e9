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
