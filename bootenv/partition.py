"""The disk layout: a pure GPT plan, and a thin pyparted applier.

One layout boots under both firmwares (see docs/AGENT.md):

    1  bios  1 MiB    BIOS boot partition (bios_grub): grub's core.img, for SeaBIOS/legacy
    2  esp   260 MiB  EFI system partition (vfat, esp flag): EFI/BOOT/BOOTX64.EFI
    3  root  rest     ext4, the OS sub-image grown to fill it

A disk with 4096-byte sectors has the same layout, but boots by UEFI only: the BIOS
boot partition is left unwritten there (bootloader.plan_boot says why).

Every partition starts and ends on a 1 MiB boundary, which is aligned for 512- and
4096-byte sectors, RAID stripes and SSD erase blocks alike.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bootenv.errors import FatalError, UserError
from bootenv.log import human_bytes

log = logging.getLogger(__name__)

MiB = 1 << 20
FIRST = 1 * MiB  # the primary GPT lives below this
BIOS_SIZE = 1 * MiB
# FAT32 needs at least 65525 clusters, and on a 4Kn disk mkfs.vfat makes one 4 KiB
# sector a cluster: 256 MiB gives only 65376, which mtools then refuses to write to.
# 260 MiB (66398 clusters) is also Microsoft's minimum ESP for 4Kn disks.
ESP_SIZE = 260 * MiB
GPT_ENTRIES_BYTES = 128 * 128  # 128 entries of 128 bytes


class Role(StrEnum):
    BIOS = "bios"
    ESP = "esp"
    ROOT = "root"


@dataclass(frozen=True)
class PlannedPartition:
    number: int
    role: Role
    start: int  # first sector
    length: int  # sectors
    sector_size: int

    @property
    def end(self) -> int:
        """Last sector (inclusive, as parted counts)."""
        return self.start + self.length - 1

    @property
    def offset(self) -> int:
        return self.start * self.sector_size

    @property
    def size(self) -> int:
        return self.length * self.sector_size


@dataclass(frozen=True)
class PartitionPlan:
    disk_size: int  # bytes
    sector_size: int
    partitions: tuple[PlannedPartition, ...]

    def part(self, role: Role) -> PlannedPartition:
        for p in self.partitions:
            if p.role is role:
                return p
        raise KeyError(role)

    @property
    def bios(self) -> PlannedPartition:
        return self.part(Role.BIOS)

    @property
    def esp(self) -> PlannedPartition:
        return self.part(Role.ESP)

    @property
    def root(self) -> PlannedPartition:
        return self.part(Role.ROOT)


def backup_gpt_bytes(sector_size: int) -> int:
    """The backup GPT at the end of the disk: its entries and its header sector."""
    return GPT_ENTRIES_BYTES + sector_size


def required_size(min_root: int, sector_size: int = 512) -> int:
    """The smallest disk that holds the layout with a root partition of `min_root` bytes."""
    root = -(-min_root // MiB) * MiB
    return FIRST + BIOS_SIZE + ESP_SIZE + root + backup_gpt_bytes(sector_size)


def describe_need(min_root: int, sector_size: int, what: str) -> str:
    """How much disk a root of `min_root` bytes for `what` takes, and what for."""
    need, root = required_size(min_root, sector_size), -(-min_root // MiB) * MiB
    return (
        f"{human_bytes(need)}: a root of {human_bytes(root)} for {what}; "
        f"{human_bytes(need - root)} for the boot partitions and the partition tables"
    )


def plan_partitions(disk_size: int, sector_size: int, min_root: int, what: str = "") -> PartitionPlan:
    """Lay out a disk of `disk_size` bytes; the root partition gets everything left.
    `what`: what the root holds, for the error when the disk is too small."""
    if sector_size not in (512, 4096):
        raise UserError(f"unsupported logical sector size {sector_size}")
    need = required_size(min_root, sector_size)
    if disk_size < need:
        needs = (
            f"it needs {describe_need(min_root, sector_size, what)}"
            if what
            else f"the image needs {human_bytes(need)}"
        )
        raise UserError(f"the disk is too small: {human_bytes(disk_size)}, {needs}", hint="use a bigger disk")
    # The root partition ends on the last MiB boundary that leaves room for the backup GPT.
    root_end = (disk_size - backup_gpt_bytes(sector_size)) // MiB * MiB
    bounds = [
        (Role.BIOS, FIRST, BIOS_SIZE),
        (Role.ESP, FIRST + BIOS_SIZE, ESP_SIZE),
        (Role.ROOT, FIRST + BIOS_SIZE + ESP_SIZE, root_end - (FIRST + BIOS_SIZE + ESP_SIZE)),
    ]
    parts = tuple(
        PlannedPartition(n, role, start // sector_size, size // sector_size, sector_size)
        for n, (role, start, size) in enumerate(bounds, start=1)
    )
    return PartitionPlan(disk_size, sector_size, parts)


def partition_node(disk: str, number: int) -> str:
    """The kernel's name for a partition: sda → sda3, nvme0n1 / loop0 / mmcblk0 → ...p3."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def apply_plan(path: str, plan: PartitionPlan) -> None:
    """Write `plan` as a fresh GPT on `path` (a disk or a disk image file).

    On a block device the kernel is then told to re-read the table, and we wait for
    udev to create the partition nodes before anyone uses them.
    """
    import parted

    try:
        device = parted.getDevice(path)
        try:
            _write_table(parted, device, path, plan)
        finally:
            # libparted caches devices by path: a loop device re-attached later with
            # another sector size would otherwise keep the old geometry.
            device.removeFromCache()
    except _ped_errors(parted) as exc:
        # pyparted's exceptions are neither BootenvError nor OSError: without this the
        # CLI would end in a traceback instead of one line.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise FatalError(f"cannot write the partition table of {path}: {detail}") from exc
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if stat.S_ISBLK(os.stat(path).st_mode):
        reread(path)


def _ped_errors(parted: Any) -> tuple[type[Exception], ...]:
    """The exceptions libparted raises through pyparted (`_ped.IOException`, ...).

    They live in pyparted's C module, `_ped`, which `parted` re-exports one by one."""
    ped = vars(parted._ped).values()
    return tuple(v for v in ped if isinstance(v, type) and issubclass(v, Exception))


def _write_table(parted: Any, device: Any, path: str, plan: PartitionPlan) -> None:
    if device.sectorSize != plan.sector_size:
        raise FatalError(f"{path} has {device.sectorSize}-byte sectors, the plan {plan.sector_size}")
    if device.length * device.sectorSize < plan.disk_size:
        raise FatalError(f"{path} is smaller than the plan assumed")
    disk = parted.freshDisk(device, "gpt")
    for p in plan.partitions:
        geom = parted.Geometry(device=device, start=p.start, length=p.length)
        fs = parted.FileSystem(type="fat32" if p.role is Role.ESP else "ext4", geometry=geom)
        part = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, fs=fs, geometry=geom)
        disk.addPartition(part, constraint=parted.Constraint(exactGeom=geom))
        part.set_name(p.role.value)
        if p.role is Role.BIOS:
            part.setFlag(parted.PARTITION_BIOS_GRUB)
        elif p.role is Role.ESP:
            part.setFlag(parted.PARTITION_BOOT)  # on GPT, "boot" is the ESP type GUID
    # commitToDevice, not commit: apply_plan tells the kernel separately, so that a disk
    # whose partitions the kernel cannot show (a loop device without partscan) still works.
    disk.commitToDevice()


def reread(path: str) -> None:
    """Make the kernel re-read `path`'s partition table, then wait for udev."""
    from bootenv.blockdev import reread_partitions

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for attempt in range(5):
            try:
                reread_partitions(fd)
                break
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    # A loop device attached without -P cannot have partitions: callers
                    # fall back to offset loop devices (see agent_disk.partition_devices).
                    log.info("%s does not support partitions in the kernel; using offsets", path)
                    return
                if exc.errno != errno.EBUSY or attempt == 4:
                    raise FatalError(f"cannot re-read the partition table of {path}: {exc}") from exc
                # udev may still hold the disk open after the previous change event.
                time.sleep(0.5 * (attempt + 1))
    finally:
        os.close(fd)
    settle()


def settle(timeout: float = 30.0) -> None:
    """Wait for udev to finish creating device nodes (skipped where udev is absent).

    The kernel announces the new partitions with uevents, and udev creates /dev/sdX3
    (and its by-uuid links) asynchronously: using the node before the queue drained
    races with udev, which may also still hold the disk open.
    """
    from bootenv.blockdev import settle as udev_settle
    from bootenv.run import which

    try:
        which("udevadm")
    except UserError:
        log.debug("no udevadm: nothing to wait for")
        return
    udev_settle(timeout)


def wait_for_node(path: str, timeout: float = 10.0) -> bool:
    """Poll for a device node udev creates asynchronously; False if it never appears."""
    deadline = time.monotonic() + timeout
    while True:
        if Path(path).exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
