"""The partition plan: alignment, sizes, both sector sizes, and too-small disks."""

from __future__ import annotations

import pytest

from bootenv.errors import UserError
from bootenv.partition import (
    MiB,
    Role,
    backup_gpt_bytes,
    partition_node,
    plan_partitions,
    required_size,
)

GiB = 1 << 30


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("disk_size", [8 * GiB, 8 * GiB + 12345 * 512, 2 * 1024 * GiB + 7 * MiB])
def test_layout(sector: int, disk_size: int) -> None:
    disk_size -= disk_size % sector
    plan = plan_partitions(disk_size, sector, 2 * GiB)
    bios, esp, root = plan.partitions
    assert [p.role for p in plan.partitions] == [Role.BIOS, Role.ESP, Role.ROOT]
    assert [p.number for p in plan.partitions] == [1, 2, 3]
    assert (bios.offset, bios.size) == (1 * MiB, 1 * MiB)
    assert (esp.offset, esp.size) == (2 * MiB, 256 * MiB)
    assert root.offset == 258 * MiB
    for p in plan.partitions:
        assert p.offset % MiB == 0 and p.size % MiB == 0  # 1 MiB aligned
        assert p.start * sector == p.offset and p.length * sector == p.size
    # No overlap, and the root partition fills the disk up to the backup GPT.
    assert bios.end + 1 == esp.start and esp.end + 1 == root.start
    end = root.offset + root.size
    assert end <= disk_size - backup_gpt_bytes(sector) < end + MiB


def test_sector_numbers() -> None:
    p512 = plan_partitions(8 * GiB, 512, GiB)
    p4k = plan_partitions(8 * GiB, 4096, GiB)
    assert [p.start for p in p512.partitions] == [2048, 4096, 528384]
    assert [p.start for p in p4k.partitions] == [256, 512, 66048]
    assert p512.root.end == (8 * GiB - MiB) // 512 - 1  # the last MiB holds the backup GPT
    assert p512.bios is p512.part(Role.BIOS) and p512.esp.role is Role.ESP


@pytest.mark.parametrize("sector", [512, 4096])
def test_required_size_is_exact(sector: int) -> None:
    root = 1500 * MiB + 1
    need = required_size(root, sector)
    plan = plan_partitions(need, sector, root)
    assert plan.root.size >= root
    with pytest.raises(UserError, match="too small"):
        plan_partitions(need - sector, sector, root)


def test_too_small_and_bad_sector() -> None:
    with pytest.raises(UserError, match=r"too small: 100.0 MiB, the image needs"):
        plan_partitions(100 * MiB, 512, 10 * MiB)
    with pytest.raises(UserError, match="sector size 1024"):
        plan_partitions(8 * GiB, 1024, GiB)


def test_partition_node_names() -> None:
    assert partition_node("/dev/sda", 3) == "/dev/sda3"
    assert partition_node("/dev/vdb", 1) == "/dev/vdb1"
    assert partition_node("/dev/nvme0n1", 3) == "/dev/nvme0n1p3"
    assert partition_node("/dev/mmcblk0", 2) == "/dev/mmcblk0p2"
    assert partition_node("/dev/loop7", 1) == "/dev/loop7p1"
