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

Both load /boot/grub/grub.cfg and their modules from /boot/grub/<platform>/ on the
root filesystem, which we also write.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from bootenv.errors import FatalError
from bootenv.run import run, which

log = logging.getLogger(__name__)

GRUB_LIB = Path("/usr/lib/grub")
BIOS = "i386-pc"
EFI = "x86_64-efi"
SECTOR = 512  # grub's blocklists count 512-byte sectors whatever the disk's sector size
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


def early_config(root_uuid: str) -> str:
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n"


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
                "/boot/grub",
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
    for platform in (BIOS, EFI):
        dest = root / "boot/grub" / platform
        dest.mkdir(parents=True, exist_ok=True)
        for f in (GRUB_LIB / platform).iterdir():
            if f.suffix in (".mod", ".lst"):
                shutil.copy2(f, dest / f.name)


def install_bios(disk: str, root: Path, root_uuid: str, bios_offset: int, bios_size: int) -> None:
    """Build core.img, keep a copy in /boot/grub/i386-pc, and embed it into the disk."""
    core_path = root / "boot/grub" / BIOS / "core.img"
    _mkimage(BIOS, core_path, root_uuid, BIOS_MODULES)
    core_sector = bios_offset // SECTOR
    core = patch_core(core_path.read_bytes(), core_sector, bios_size)
    boot_img = (GRUB_LIB / BIOS / "boot.img").read_bytes()
    shutil.copy2(GRUB_LIB / BIOS / "boot.img", root / "boot/grub" / BIOS / "boot.img")
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
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
