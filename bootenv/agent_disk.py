"""The disk `bootenv agent` writes: choosing it, checking it before the first write,
reaching its partitions, and wiping it after a failure.

If anything fails after the disk was touched, its partition table and filesystem
signatures are wiped (`wipe_disk`) so the machine can never boot a half-written OS.
Before the new table is written, the places of its boot partitions are cleared
(`clear_loaders`), so that a run stopped short of its own loaders (a power cut) leaves
none of an earlier install's there either.
"""

from __future__ import annotations

import logging
import os
import stat
from contextlib import ExitStack
from pathlib import Path

from bootenv.blockdev import check_file_not_attached, check_not_in_use, device_size, sector_size
from bootenv.cmdline import AgentConfig, DiskKind
from bootenv.disks import DiskChoice, choose_disk, read_disks, resolve_selector
from bootenv.errors import BootenvError, UserError
from bootenv.partition import MiB, PartitionPlan, Role, partition_node, plan_partitions, wait_for_node
from bootenv.run import run, which

log = logging.getLogger(__name__)


def choose(cfg: AgentConfig, min_size: int, needs: str = "") -> DiskChoice:
    """The disk to install on, of at least `min_size` bytes (`needs`: what for, told
    when every disk is too small)."""
    disks = read_disks()
    sel = resolve_selector(cfg.disk)
    if sel.kind is DiskKind.DEVICE and not any(d.devnode == sel.value for d in disks):
        raise UserError(f"bootenv.disk={cfg.disk.value}: no such disk")
    return choose_disk(disks, sel, min_size, needs)


def preflight(disk: str, min_root: int, what: str = "") -> PartitionPlan:
    """Every check that must pass before the first write; returns the partition plan
    (`min_root`: the bytes its root must hold, `what`: what for, told when the disk is
    too small)."""
    try:
        st = os.stat(disk)
    except FileNotFoundError as exc:
        raise UserError(f"{disk} does not exist") from exc
    if stat.S_ISBLK(st.st_mode):
        check_not_in_use(disk, st.st_rdev)
        flags = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC
    elif stat.S_ISREG(st.st_mode):
        check_file_not_attached(disk)
        flags = os.O_RDONLY | os.O_CLOEXEC
    else:
        raise UserError(f"{disk} is neither a disk nor a disk image file")
    try:
        fd = os.open(disk, flags)
    except OSError as exc:
        raise UserError(f"{disk} is in use (mounted or claimed): {exc.strerror}") from exc
    try:
        size, sector = device_size(fd), sector_size(fd)
    finally:
        os.close(fd)
    if size % sector:
        # parted sees only whole sectors: the plan would end past the device's end.
        raise UserError(
            f"{disk} is {size} bytes, not a whole number of its {sector}-byte sectors",
            hint="truncate or grow the disk image to a multiple of its sector size",
        )
    return plan_partitions(size, sector, min_root, what)


def partition_devices(disk: str, plan: PartitionPlan, stack: ExitStack) -> dict[Role, str]:
    """The partitions' device nodes; offset loop devices where the kernel shows none.

    A disk image file, or a loop device attached without partition scanning, has no
    partition nodes: there we attach each partition with losetup --offset/--sizelimit,
    with the disk's sector size (a 4Kn disk's ESP is formatted with 4 KiB sectors, as
    firmware reading it through the disk expects).
    """
    out: dict[Role, str] = {}
    is_blk = stat.S_ISBLK(os.stat(disk).st_mode)
    for p in plan.partitions:
        node = partition_node(disk, p.number)
        if is_blk and wait_for_node(node, timeout=0 if _no_partscan(disk) else 10.0):
            out[p.role] = node
            continue
        # 512 is losetup's own default: only another size needs the option (util-linux 2.30).
        sectors = ["--sector-size", str(plan.sector_size)] if plan.sector_size != 512 else []
        loop = run(
            [
                which("losetup"),
                "--find",
                "--show",
                "--offset",
                str(p.offset),
                "--sizelimit",
                str(p.size),
                *sectors,
                disk,
            ]
        )
        dev = loop.stdout.decode().strip()
        stack.callback(run, [which("losetup"), "--detach", dev], check=False)
        out[p.role] = dev
    return out


def _no_partscan(disk: str) -> bool:
    name = Path(disk).name
    flag = Path(f"/sys/block/{name}/loop/partscan")
    return flag.exists() and flag.read_text().strip() == "0"


def clear_loaders(disk: str, plan: PartitionPlan) -> None:
    """Zero the first MiB of the BIOS boot partition (all of it) and of the ESP, where
    the plan puts them, before the new table names them: an earlier install's loader
    there (grub's core.img; a FAT with BOOTX64.EFI and a grub.cfg naming the old root)
    would otherwise be found by the firmware, should the run stop (a power cut) before
    it writes its own."""
    fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for p in (plan.bios, plan.esp):
            os.pwrite(fd, bytes(min(MiB, p.size)), p.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe_disk(disk: str, plan: PartitionPlan) -> None:
    """Leave the disk unbootable: no partition table, no filesystem signatures."""
    log.error("wiping %s so that it cannot boot a half-written system", disk)
    try:
        fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.error("cannot open %s to wipe it: %s", disk, exc)
        return
    try:
        zero = bytes(MiB)
        size = plan.disk_size
        # The primary and backup GPT, the MBR, and every partition's superblocks.
        for offset in (0, max(0, size - MiB), *(p.offset for p in plan.partitions)):
            os.pwrite(fd, zero, offset)
        os.fsync(fd)
    except OSError as exc:
        log.error("could not wipe %s: %s", disk, exc)
    finally:
        os.close(fd)
    try:
        run([which("wipefs"), "-a", disk], check=False)
    except BootenvError as exc:
        log.error("wipefs: %s", exc)
