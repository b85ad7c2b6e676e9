"""Which disk to install on: a pure rule over DiskInfo records, and a thin pyudev reader.

The rule (also in docs/AGENT.md):

1. A disk is never chosen if it is removable, read-only, smaller than the layout needs,
   mounted or holding the running root or the boot media, or held by another device
   (RAID, LVM).
2. `bootenv.disk=/dev/X` (or a symlink to it, such as /dev/disk/by-id/...: see
   `resolve_selector`), `serial:S` or `path:P` picks that one disk, and fails (with
   the reason) if rule 1 rejects it. Only a disk named this way may be a virtual
   device (loop, ram, zram, optical, device-mapper, md, nbd) or a disk on USB (see
   `bus_of`: many USB sticks and SSDs say they are not removable, and the stick iPXE
   booted from is not mounted).
3. `auto` picks, among the rest: non-rotational disks first, then the smallest disk
   that fits, then the one with the lowest stable path (udev's ID_PATH, else the
   device name). So the same hardware always gets the same choice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bootenv.blockdev import loops_over
from bootenv.cmdline import DiskKind, DiskSelector
from bootenv.errors import UserError
from bootenv.log import human_bytes

log = logging.getLogger(__name__)

MiB = 1 << 20
VIRTUAL_PREFIXES = ("loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd")
USB_BUS = re.compile(r"usb[0-9]+")  # a USB bus (its root hub) in a sysfs device path


@dataclass(frozen=True)
class DiskInfo:
    devnode: str  # /dev/sda
    size: int  # bytes
    rotational: bool = False
    removable: bool = False
    read_only: bool = False
    serial: str = ""  # ID_SERIAL
    serial_short: str = ""  # ID_SERIAL_SHORT
    id_path: str = ""  # ID_PATH, e.g. pci-0000:00:04.0
    bus: str = ""  # ID_BUS ("ata", "scsi", ...), but "usb" for any disk on USB: see `bus_of`
    model: str = ""
    mounts: tuple[str, ...] = ()  # mount points of the disk or its partitions
    holders: tuple[str, ...] = ()  # md/dm devices built on it
    boot: bool = False  # holds the running root or the media we booted from

    @property
    def name(self) -> str:
        return self.devnode.rsplit("/", 1)[-1]

    @property
    def usb(self) -> bool:
        # ID_PATH too, for a record made without `bus_of` (it reads ID_PATH the same way).
        return self.bus == "usb" or "-usb-" in self.id_path

    def describe(self) -> str:
        bits = [self.devnode, human_bytes(self.size)]
        bits += [x for x in (self.model, self.serial_short or self.serial) if x]
        return " ".join(bits)


@dataclass(frozen=True)
class Rejection:
    disk: DiskInfo
    reason: str


@dataclass(frozen=True)
class DiskChoice:
    disk: DiskInfo
    rejected: tuple[Rejection, ...]


def rejection(disk: DiskInfo, min_size: int, *, auto: bool = True) -> str | None:
    """Why `disk` may not be installed on, or None if it may.

    Virtual devices (a loop device, an md array) are only taken when named explicitly.
    """
    if auto and disk.name.startswith(VIRTUAL_PREFIXES):
        return "virtual device"
    if disk.boot:
        return "holds the running root or the boot media"
    if disk.removable:
        return "removable"
    if auto and disk.usb:
        return "on USB (name it in bootenv.disk= to install on it)"
    if disk.read_only:
        return "read-only"
    if disk.size == 0:
        return "no medium (size 0)"
    if disk.size < min_size:
        return f"too small ({disk.size // MiB} MiB, the image needs {-(-min_size // MiB)} MiB)"
    if disk.mounts:
        return f"mounted at {', '.join(disk.mounts)}"
    if disk.holders:
        return f"in use by {', '.join(disk.holders)}"
    return None


def bus_of(properties: Mapping[str, str], devpath: str) -> str:
    """The disk's bus: udev's ID_BUS, but "usb" for any disk reached over USB.

    ID_BUS alone misses some: udev runs ata_id on a USB disk that says it is not
    removable (a SATA disk in an enclosure, many USB SSDs), and ata_id sets ID_BUS=ata
    (60-persistent-storage.rules). The path says USB whatever the disk answers: a
    `-usb-` part in ID_PATH (as in /dev/disk/by-path), or a USB bus (`usb1`) among the
    parents in the device's sysfs path (DEVPATH: /devices/pci0000:00/.../usb2/2-3/...).
    """
    bus = properties.get("ID_BUS", "")
    if bus == "usb" or "-usb-" in properties.get("ID_PATH", ""):
        return "usb"
    if any(USB_BUS.fullmatch(part) for part in devpath.split("/")):
        return "usb"
    return bus


def resolve_selector(sel: DiskSelector) -> DiskSelector:
    """`bootenv.disk=/dev/disk/by-id/...` (any symlink to a disk) as the node it points
    to: udev lists each disk by its node, which is what `choose_disk` compares. Done
    here, where the disks are read, and not in the command line's parser, which reads no
    files."""
    if sel.kind is not DiskKind.DEVICE:
        return sel
    node = os.path.realpath(sel.value)
    if node != sel.value:
        log.info("bootenv.disk=%s is %s", sel.value, node)
    return DiskSelector(DiskKind.DEVICE, node)


def _matches(disk: DiskInfo, sel: DiskSelector) -> bool:
    if sel.kind is DiskKind.DEVICE:
        return disk.devnode == sel.value
    if sel.kind is DiskKind.SERIAL:
        return sel.value in (disk.serial, disk.serial_short)
    if sel.kind is DiskKind.PATH:
        return sel.value in (disk.id_path, f"/dev/disk/by-path/{disk.id_path}")
    return True


def sort_key(disk: DiskInfo) -> tuple[bool, int, str]:
    return (disk.rotational, disk.size, disk.id_path or disk.devnode)


def choose_disk(disks: list[DiskInfo], sel: DiskSelector, min_size: int, needs: str = "") -> DiskChoice:
    """Apply the rule above; every disk not chosen comes back with the reason why.
    `needs`: what `min_size` is made of, told once when a disk that would do is too small."""
    rejected: list[Rejection] = []
    ok: list[DiskInfo] = []
    for disk in sorted(disks, key=lambda d: d.devnode):
        if not _matches(disk, sel):
            rejected.append(Rejection(disk, f"not {sel}"))
            continue
        reason = rejection(disk, min_size, auto=sel.kind is DiskKind.AUTO)
        if reason:
            rejected.append(Rejection(disk, reason))
        else:
            ok.append(disk)
    if not ok:
        relevant = [r for r in rejected if _matches(r.disk, sel)]
        detail = "; ".join(f"{r.disk.devnode}: {r.reason}" for r in relevant) or "no such disk"
        if needs and any(0 < r.disk.size < min_size for r in relevant):
            detail += f"; the disk needs {needs}"
        raise UserError(f"no disk to install on ({sel}): {detail}")
    if sel.kind is not DiskKind.AUTO and len(ok) > 1:
        names = ", ".join(d.devnode for d in ok)
        raise UserError(f"bootenv.disk={sel} matches several disks: {names}")
    ok.sort(key=sort_key)
    chosen = ok[0]
    rejected += [Rejection(d, f"{chosen.devnode} is preferred") for d in ok[1:]]
    return DiskChoice(chosen, tuple(rejected))


def _mounted(mountinfo: str) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and ":" in fields[2]:
            major, minor = fields[2].split(":")
            out.setdefault((int(major), int(minor)), []).append(fields[4])
    return out


BOOT_MOUNTS = ("/", "/run/initramfs/live", "/run/live/medium", "/cdrom", "/boot", "/boot/efi")


def read_disks(mountinfo: str | None = None) -> list[DiskInfo]:
    """Every whole disk udev knows, with what the rule needs to know about it."""
    import pyudev

    info = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    mounted = _mounted(info)
    root_dev = os.stat("/").st_dev
    root = (os.major(root_dev), os.minor(root_dev))
    context = pyudev.Context()
    disks = []
    for dev in context.list_devices(subsystem="block", DEVTYPE="disk"):
        if not dev.device_node:
            continue
        family = [dev, *context.list_devices(subsystem="block", DEVTYPE="partition", parent=dev)]
        mounts: list[str] = []
        holders: list[str] = []
        boot = False
        for member in family:
            num = (os.major(member.device_number), os.minor(member.device_number))
            boot = boot or (num == root and root[0] != 0)
            mounts += mounted.get(num, [])
            hold = Path(member.sys_path) / "holders"
            if hold.is_dir():
                holders += sorted(p.name for p in hold.iterdir())
        holders += loops_over([member.device_number for member in family])
        disks.append(
            DiskInfo(
                devnode=dev.device_node,
                size=int(_attr(dev, "size") or 0) * 512,  # sysfs counts 512-byte units
                rotational=_attr(dev, "queue/rotational") == "1",
                removable=_attr(dev, "removable") == "1",
                read_only=_attr(dev, "ro") == "1",
                serial=dev.properties.get("ID_SERIAL", ""),
                serial_short=dev.properties.get("ID_SERIAL_SHORT", ""),
                id_path=dev.properties.get("ID_PATH", ""),
                bus=bus_of(dev.properties, dev.device_path),
                model=dev.properties.get("ID_MODEL", ""),
                mounts=tuple(sorted(set(mounts))),
                holders=tuple(holders),
                boot=boot or any(m in BOOT_MOUNTS for m in mounts),
            )
        )
    return disks


def _attr(dev: object, name: str) -> str:
    try:
        value = dev.attributes.asstring(name)  # type: ignore[attr-defined]
    except (KeyError, UnicodeDecodeError):
        return ""
    return str(value).strip()


def log_choice(choice: DiskChoice) -> None:
    log.info("Installing on %s", choice.disk.describe())
    for r in choice.rejected:
        log.info("  not %s: %s", r.disk.devnode, r.reason)
