"""Install grub for BIOS and UEFI from the ramdisk's own grub binaries.

What we chose, and why (docs/AGENT.md): a gold image need not contain grub, and
`grub-install` must probe the target's devices (grub-probe), which fails on the
offset loop devices and device-less ramdisks we run on. So we build both images with
`grub-mkimage`, with an embedded early config that finds the root filesystem by its
UUID, and place them ourselves:

- BIOS: boot.img goes to the MBR's code area (the GPT's protective partition entry
  and disk signature are kept) and core.img into the BIOS boot partition, patched
  exactly as grub-bios-setup patches them (the blocklist and the kernel sector).
- UEFI: the image is EFI/BOOT/BOOTX64.EFI on the ESP (the removable-media path every
  firmware tries, so no NVRAM entry is needed), copied with mtools (no vfat mount).

A disk with 4096-byte logical sectors (4Kn) gets the UEFI loader only, and a machine
that started the ramdisk by legacy BIOS is refused such a disk before anything is
written (`plan_boot`): grub's BIOS boot code cannot load core.img from it.

Both load /boot/grub/grub.cfg and their modules from /boot/grub/<platform>/ on the
root filesystem, which we also write.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from bootenv.blockdev import sector_size
from bootenv.errors import FatalError, UserError
from bootenv.intree import in_target
from bootenv.run import run, which

log = logging.getLogger(__name__)

GRUB_LIB = Path("/usr/lib/grub")
GRUB_DIR = "/boot/grub"  # in the target: grub.cfg, and the modules per platform
GRUB_CFG = f"{GRUB_DIR}/grub.cfg"
BIOS = "i386-pc"
EFI = "x86_64-efi"
# The only logical sector size grub's BIOS boot code can load core.img from. What we
# relied on, in grub 2's sources: boot.img (grub-core/boot/i386/pc/boot.S) reads the
# sector at kernel_sector with int 13h, whose LBAs count the drive's own sectors, and
# copies its first 512 bytes to 0x8000: diskboot.img. diskboot.img (diskboot.S) reads
# each blocklist entry's sectors the same way, but copies only 512 bytes per sector read
# and moves its destination on by as much, as if sectors were 512 bytes; and the rest of
# core.img starts 512 bytes in, inside diskboot's own sector on a 4Kn disk. Nor does
# grub-bios-setup (util/setup.c) try: it writes both sector numbers in grub's 512-byte
# disk units whatever the disk, which on a 4Kn disk point 8 times too far. And a BIOS
# may not read such a disk at all: SeaBIOS 1.16 refuses a virtio-blk or SCSI disk with
# 4 KiB sectors (src/hw/virtio-blk.c, src/hw/blockcmd.c).
SECTOR = 512
# Built into the images; everything else is loaded from /boot/grub/<platform>/.
CORE_MODULES = ("part_gpt", "part_msdos", "ext2", "search_fs_uuid", "search", "normal", "configfile")
BIOS_MODULES = ("biosdisk", *CORE_MODULES)
EFI_MODULES = (*CORE_MODULES, "fat")

# Offsets in boot.img and diskboot.img (grub's include/grub/i386/pc/boot.h).
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
NT_MAGIC, PART_END = 0x1B8, 0x1FE
BLOCKLIST = SECTOR - 12  # the first blocklist entry: u64 start, u16 len, u16 segment
KERNEL_SEG = 0x800


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


EFI_SYSFS = Path("/sys/firmware/efi")


def running_firmware(efi_dir: Path = EFI_SYSFS) -> Firmware:
    """The firmware that started this ramdisk: the kernel fills /sys/firmware/efi only
    when UEFI booted it. grub-install picks its default platform by the same test, a
    directory that is there and not empty (grub-core/osdep/linux/platform.c)."""
    return Firmware.UEFI if efi_dir.is_dir() and any(efi_dir.iterdir()) else Firmware.BIOS


@dataclass(frozen=True)
class BootPlan:
    """Which loaders go on the disk, and why one is left out."""

    bios: bool  # boot.img in the MBR and core.img in the BIOS boot partition
    efi: bool  # EFI/BOOT/BOOTX64.EFI on the ESP
    note: str | None = None  # for the log and the callback, when a loader is left out

    @property
    def loaders(self) -> tuple[str, ...]:
        """Their names as the agent reports them: bios, uefi."""
        return (*(("bios",) if self.bios else ()), *(("uefi",) if self.efi else ()))

    def describe(self) -> str:
        return " and ".join(name.upper() for name in self.loaders) + ("" if self.bios else " only")


def plan_boot(disk: str, sector: int, firmware: Firmware) -> BootPlan:
    """Both loaders on a disk of 512-byte sectors. On any other, the UEFI loader only:
    grub's BIOS boot code cannot load core.img from it (see SECTOR). If this machine
    started the ramdisk by legacy BIOS, it would never boot the disk, so the disk is
    refused now, before the first write: with kexec, it would come up once and fail
    only at its first reboot."""
    if sector == SECTOR:
        return BootPlan(bios=True, efi=True)
    why = f"{disk} has {sector}-byte logical sectors, which grub cannot boot from under legacy BIOS"
    if firmware is Firmware.BIOS:
        raise UserError(
            f"{why}, and this machine started the ramdisk by legacy BIOS",
            hint="boot the machine by UEFI, or give it a disk with 512-byte logical sectors (512e)",
        )
    return BootPlan(bios=False, efi=True, note=f"{why}: installing the UEFI loader only")


def early_config(root_uuid: str) -> str:
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root){GRUB_DIR}\n"


def grub_cfg_text(root_uuid: str, kernel: str, initrd: str | None, args: tuple[str, ...], title: str) -> str:
    """The menu both firmwares load: one entry that boots the target's kernel by UUID."""
    lines = [
        "# Written by bootenv: boots the installed system under BIOS and UEFI.",
        "set timeout=2",
        "set default=0",
        "serial --unit=0 --speed=115200",
        "terminal_input console serial",
        "terminal_output console serial",
        "insmod part_gpt",
        "insmod ext2",
        "insmod all_video",
        "insmod gzio",
        f"search --no-floppy --fs-uuid --set=root {root_uuid}",
        f"menuentry '{title}' {{",
        f"\tlinux {kernel} {' '.join(args)}",
    ]
    if initrd:
        lines.append(f"\tinitrd {initrd}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def patch_mbr(boot_img: bytes, old_mbr: bytes, core_sector: int) -> bytes:
    """boot.img made to load core.img from `core_sector`, keeping the disk's own bytes."""
    if len(boot_img) != SECTOR or len(old_mbr) < SECTOR:
        raise FatalError("boot.img and the MBR must be one 512-byte sector")
    mbr = bytearray(boot_img)
    mbr[BPB_START:BPB_END] = old_mbr[BPB_START:BPB_END]
    struct.pack_into("<Q", mbr, KERNEL_SECTOR, core_sector)
    mbr[BOOT_DRIVE] = 0xFF  # use the drive the BIOS booted from
    # A hard disk: skip the check for buggy BIOSes that pass a floppy drive number.
    mbr[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    mbr[NT_MAGIC:PART_END] = old_mbr[NT_MAGIC:PART_END]  # disk signature and partition table
    return bytes(mbr)


def patch_core(core_img: bytes, core_sector: int, room: int) -> bytes:
    """core.img with its blocklist pointing at its own contiguous sectors on disk."""
    data = bytearray(core_img)
    if len(data) % SECTOR:
        data += bytes(SECTOR - len(data) % SECTOR)
    if len(data) > room:
        raise FatalError(f"core.img ({len(data)} bytes) does not fit the BIOS boot partition ({room})")
    sectors = len(data) // SECTOR
    _, length, _ = struct.unpack_from("<QHH", data, BLOCKLIST - 12)
    if length:
        raise FatalError("core.img has an unexpected second blocklist entry")
    # diskboot.img (the first sector) loads the rest at segment 0x820, right after itself.
    struct.pack_into("<QHH", data, BLOCKLIST, core_sector + 1, sectors - 1, KERNEL_SEG + (SECTOR >> 4))
    return bytes(data)


def _mkimage(platform: str, out: Path, root_uuid: str, modules: tuple[str, ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="bootenv-grub-") as tmp:
        cfg = Path(tmp) / "early.cfg"
        cfg.write_text(early_config(root_uuid))
        run(
            [
                which("grub-mkimage"),
                "-O",
                platform,
                "-d",
                GRUB_LIB / platform,
                "-p",
                GRUB_DIR,
                "-c",
                cfg,
                "-o",
                out,
                *modules,
            ]
        )


def check_available() -> None:
    for platform in (BIOS, EFI):
        if not (GRUB_LIB / platform / "kernel.img").exists():
            raise FatalError(
                f"grub's {platform} files are missing from this system",
                hint="install grub-pc-bin and grub-efi-amd64-bin",
            )


def copy_modules(root: Path) -> None:
    """grub's modules into the target's /boot/grub/<platform>/, where the target's
    symlinks put them (as grub, which resolves them on the root filesystem, finds them)."""
    for platform in (BIOS, EFI):
        dest = in_target(root, f"{GRUB_DIR}/{platform}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in (GRUB_LIB / platform).iterdir():
            if f.suffix in (".mod", ".lst"):
                _copy_in(f, dest / f.name)


def write_config(root: Path, text: str) -> None:
    """The target's /boot/grub/grub.cfg (see grub_cfg_text)."""
    path = _replaced(in_target(root, GRUB_CFG, last=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _replaced(path: Path) -> Path:
    """`path`, with a symlink in its place removed: a file we write there replaces it,
    never goes through it."""
    if path.is_symlink():
        path.unlink()
    return path


def _copy_in(src: Path, dest: Path) -> None:
    shutil.copy2(src, _replaced(dest))


def install_bios(disk: str, root: Path, root_uuid: str, bios_offset: int, bios_size: int) -> None:
    """Build core.img, keep a copy in /boot/grub/i386-pc, and embed it into the disk."""
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        # The sector numbers below count 512-byte sectors, as int 13h does only on such a
        # disk: on any other, refuse rather than write a loader that reads the wrong place.
        if (size := sector_size(fd)) != SECTOR:
            raise FatalError(
                f"{disk} has {size}-byte logical sectors: grub's BIOS boot code cannot load from it"
            )
        core_path = _replaced(in_target(root, f"{GRUB_DIR}/{BIOS}/core.img", last=False))
        _mkimage(BIOS, core_path, root_uuid, BIOS_MODULES)
        core_sector = bios_offset // SECTOR
        core = patch_core(core_path.read_bytes(), core_sector, bios_size)
        boot_img = (GRUB_LIB / BIOS / "boot.img").read_bytes()
        _copy_in(GRUB_LIB / BIOS / "boot.img", core_path.with_name("boot.img"))
        old = os.pread(fd, SECTOR, 0)
        _pwrite(fd, core, bios_offset)
        _pwrite(fd, patch_mbr(boot_img, old, core_sector), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def install_efi(esp_device: str, root_uuid: str) -> None:
    """Build BOOTX64.EFI and copy it to the ESP's removable-media path."""
    with tempfile.TemporaryDirectory(prefix="bootenv-efi-") as tmp:
        image = Path(tmp) / "BOOTX64.EFI"
        _mkimage(EFI, image, root_uuid, EFI_MODULES)
        # MTOOLS_SKIP_CHECK: mtools refuses some valid geometries of a partition device.
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run([which("mmd"), "-i", esp_device, "::/EFI", "::/EFI/BOOT"], env=env)
        run([which("mcopy"), "-i", esp_device, image, "::/EFI/BOOT/BOOTX64.EFI"], env=env)
