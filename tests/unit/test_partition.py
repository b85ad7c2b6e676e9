"""The partition plan: alignment, sizes, both sector sizes, and too-small disks."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from bootenv.errors import BootenvError, FatalError, UserError
from bootenv.partition import (
    MiB,
    Role,
    apply_plan,
    backup_gpt_bytes,
    partition_node,
    plan_partitions,
    required_size,
)
from bootenv.run import run

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
    assert (esp.offset, esp.size) == (2 * MiB, 260 * MiB)
    assert root.offset == 262 * MiB
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
    assert [p.start for p in p512.partitions] == [2048, 4096, 536576]
    assert [p.start for p in p4k.partitions] == [256, 512, 67072]
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


FAT32_MIN_CLUSTERS = 65525  # with fewer it is FAT16 by definition, and mtools refuses it


def fat32_clusters(size: int) -> int:
    """The clusters mkfs.vfat -F 32 makes in `size` bytes of 4 KiB sectors: for an ESP
    this size, one sector a cluster, 32 reserved sectors, and 2 FATs of 4 bytes a cluster
    (plus 2 reserved entries). 4 KiB sectors are the worst case: at 512 bytes, the
    clusters are 512 bytes too, and eight times as many."""
    sector = 4096
    total = size // sector
    clusters = total - 32
    while 32 + 2 * -(-(clusters + 2) * 4 // sector) + clusters > total:
        clusters -= 1
    return clusters


def test_the_esp_is_big_enough_for_fat32_on_4k_sectors() -> None:
    """On a 4Kn disk, a 256 MiB ESP had 65376 clusters, below FAT32's minimum: mmd then
    failed in install_efi, after the OS was written, and the disk was wiped."""
    esp = plan_partitions(8 * GiB, 4096, GiB).esp
    assert fat32_clusters(256 * MiB) == 65376  # what mkfs.fat made of the old ESP
    assert fat32_clusters(esp.size) >= FAT32_MIN_CLUSTERS
    assert esp.size >= 260 * MiB  # Microsoft's minimum ESP on 4Kn disks


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        pytest.skip(f"{name} is not installed (dosfstools, mtools)")
    return found


def test_the_planned_esp_takes_fat32_and_the_boot_loader(allow_run: None, tmp_path: Path) -> None:
    """The same, as the real tools see it, at both sector sizes: mkfs.vfat -F 32 on a
    file of the planned ESP's size, then fsck.fat, and mmd/mcopy as install_efi runs them."""
    mkfs, fsck, mmd, mcopy, mdir = (_tool(t) for t in ("mkfs.vfat", "fsck.fat", "mmd", "mcopy", "mdir"))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    (tmp_path / "BOOTX64.EFI").write_bytes(b"MZ" + bytes(4094))
    for sector in (4096, 512):
        esp = plan_partitions(8 * GiB, sector, GiB).esp
        image = tmp_path / f"esp{sector}.img"
        with open(image, "wb") as f:
            f.truncate(esp.size)  # sparse
        run([mkfs, "-F", "32", "-S", str(sector), "-n", "EFI", image])
        out = run([fsck, "-n", image]).stdout.decode()
        found = re.search(r"\d+/(\d+) clusters", out)
        assert found, out
        assert int(found.group(1)) >= FAT32_MIN_CLUSTERS, sector
        if sector == 4096:
            assert int(found.group(1)) == fat32_clusters(esp.size)  # the model above holds
        run([mmd, "-i", image, "::/EFI", "::/EFI/BOOT"], env=env)
        run([mcopy, "-i", image, tmp_path / "BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"], env=env)
        assert "BOOTX64" in run([mdir, "-i", image, "::/EFI/BOOT"], env=env).stdout.decode()


@pytest.mark.parametrize("kind", ["empty file", "missing"])
def test_pyparted_errors_become_one_line(tmp_path: Path, kind: str) -> None:
    """libparted's own exceptions (_ped.IOException, ...) are neither BootenvError nor
    OSError: the CLI printed a traceback instead of one line."""
    path = tmp_path / "disk.img"
    if kind == "empty file":
        path.write_bytes(b"")  # too small for any partition table
    with pytest.raises(FatalError, match="cannot write the partition table of") as info:
        apply_plan(str(path), plan_partitions(8 * GiB, 512, GiB))
    assert isinstance(info.value, BootenvError) and "\n" not in str(info.value)
    assert type(info.value.__cause__).__module__ == "_ped"
    assert not path.exists() or path.stat().st_size == 0  # nothing was written
