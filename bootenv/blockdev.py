"""Block-device specifics, kept here so every writer also runs on a regular (sparse) file.

A destination is opened after the checks that must come before the first write: it is
not mounted, not swap, not held by device-mapper/md, has no loop device attached over
it, is not the running root or its disk, and is big enough. Block devices are opened
O_EXCL, which the kernel refuses for a device that is mounted or claimed (bmaptool does
the same).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootenv.errors import FatalError, UserError
from bootenv.log import human_bytes
from bootenv.run import run, which

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKRRPART = 0x125F
BLKFLSBUF = 0x1261


@dataclass(frozen=True)
class Destination:
    path: str
    fd: int
    is_block: bool
    size: int  # bytes; for a regular file, after growing it to the image size
    sector: int  # logical sector size: alignment that O_DIRECT needs


def is_block(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def device_size(fd: int) -> int:
    """Size in bytes of a block device (ioctl) or a regular file."""
    if not is_block(fd):
        return os.fstat(fd).st_size
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    size: int = struct.unpack("Q", buf)[0]
    return size


def sector_size(fd: int) -> int:
    if not is_block(fd):
        return 512
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    size: int = struct.unpack("i", buf)[0]
    return size


def _sysfs(devno: int) -> Path:
    return Path(f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}")


def _mounted_devnos(mountinfo: str) -> dict[int, str]:
    """major:minor → mount point, from /proc/self/mountinfo."""
    out: dict[int, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5 or ":" not in fields[2]:
            continue
        major, minor = (int(x) for x in fields[2].split(":"))
        out.setdefault(os.makedev(major, minor), fields[4])
    return out


def _family(devno: int) -> list[int]:
    """The device and its partitions (a whole disk's partitions are its sysfs children)."""
    devs = [devno]
    base = _sysfs(devno)
    if base.exists():
        for child in base.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                major, minor = dev.read_text().strip().split(":")
                devs.append(os.makedev(int(major), int(minor)))
    return devs


def _disk_of(devno: int) -> int:
    """The whole disk a partition belongs to (itself for a whole disk)."""
    base = _sysfs(devno)
    if not (base / "partition").exists():
        return devno
    major, minor = (base.resolve().parent / "dev").read_text().strip().split(":")
    return os.makedev(int(major), int(minor))


def _loops() -> Iterator[tuple[str, str, int]]:
    """Each attached loop device: its name, what backs it (a path), and its own devno."""
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        loop = backing.parent.parent
        try:
            path = backing.read_text().strip()
            major, minor = (loop / "dev").read_text().strip().split(":")
        except (OSError, ValueError):  # detached meanwhile
            continue
        yield loop.name, path, os.makedev(int(major), int(minor))


def loops_over(devnos: list[int]) -> list[str]:
    """The loop devices attached over any of `devnos` (a disk and its partitions). A loop
    device neither shows in its backing device's holders nor claims it: without this, a
    disk whose loop device is mounted looked free, and opened O_EXCL all the same."""
    names = []
    for name, path, _ in _loops():
        try:
            st = os.stat(path)
        except OSError:  # gone, or "(deleted)": backs nothing that is here
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in devnos:
            names.append(name)
    return sorted(names)


def check_not_in_use(path: str, devno: int, mountinfo: str | None = None) -> None:
    """Refuse a block device that is mounted, swap, held (also by a loop device over it),
    or holds the running root."""
    info = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    mounts = _mounted_devnos(info)
    family = _family(devno)
    for dev in family:
        if dev in mounts:
            raise UserError(f"{path} is in use: mounted at {mounts[dev]}", hint="unmount it first")
        holders = _sysfs(dev) / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            names = ", ".join(sorted(p.name for p in holders.iterdir()))
            raise UserError(f"{path} is in use: held by {names}")
    loops = loops_over([*family, _disk_of(devno)])  # over the disk a partition is on, too
    if loops:
        raise UserError(
            f"{path} is in use: {', '.join(loops)} is attached over it", hint="losetup -d it first"
        )
    root = os.stat("/").st_dev
    if os.major(root) and devno in (root, _disk_of(root)):
        raise UserError(f"{path} holds the running system's root filesystem")
    swaps = Path("/proc/swaps")
    if swaps.exists():
        for line in swaps.read_text().splitlines()[1:]:
            name = line.split()[0] if line.split() else ""
            if name.startswith("/dev/") and os.path.exists(name) and os.stat(name).st_rdev in _family(devno):
                raise UserError(f"{path} is in use as swap ({name})")


def check_file_not_attached(path: str) -> None:
    """Refuse a regular file that backs a mounted loop device."""
    real = os.path.realpath(path)
    info = Path("/proc/self/mountinfo").read_text()
    mounts = _mounted_devnos(info)
    for name, backing, dev in _loops():
        if backing == real and any(d in mounts for d in _family(dev)):
            raise UserError(f"{path} backs {name}, which is mounted")


def _under_dev(path: str) -> bool:
    """Whether `path` (its directory's symlinks resolved) lies in /dev."""
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return where == "/dev" or where.startswith("/dev/")


def check_fits(path: str, size: int, needed: int) -> None:
    if size < needed:
        raise UserError(
            f"{path} is too small: {human_bytes(size)} ({size} bytes), the image needs {needed} bytes",
            hint="use a bigger disk or partition",
        )


@contextmanager
def open_destination(path: str, image_size: int, *, mapped: int = 0) -> Iterator[Destination]:
    """Open `path` for writing an image of `image_size` bytes, after the safety checks.

    A regular file is created, or grown (sparsely) to the image size. Nothing is
    written before every check has passed. If the write fails, a file this call created
    is removed; a file that was there is a disk like any other (its first MiB is wiped,
    bootenv/oswrite.py).
    """
    st = _stat(path)
    if st is not None and stat.S_ISBLK(st.st_mode):
        check_not_in_use(path, st.st_rdev)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UserError(f"{path} is in use (mounted or claimed by another device)") from exc
            raise FatalError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            size = device_size(fd)
            check_fits(path, size, image_size)
            yield Destination(path, fd, True, size, sector_size(fd))
        finally:
            os.close(fd)
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is neither a block device nor a regular file")
    if _under_dev(path):
        # A mistyped disk, or a by-id link udev has not made yet: created, it would be a
        # file in RAM (devtmpfs), reported as written, in the way of the real node.
        what = "does not exist" if st is None else "is a regular file"
        raise UserError(
            f"{path} {what}: a path under /dev must be a block device", hint="check the disk's name"
        )
    if st is not None:
        check_file_not_attached(path)
    _check_free_space(path, st.st_size if st else 0, image_size, mapped)
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if st is None else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        if os.fstat(fd).st_size < image_size:
            os.ftruncate(fd, image_size)  # sparse: allocates nothing
        yield Destination(path, fd, False, os.fstat(fd).st_size, 512)
    except BaseException:
        if st is None:  # ours: nothing is lost, and nothing half-written stays
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        os.close(fd)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _check_free_space(path: str, current: int, image_size: int, mapped: int) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        vfs = os.statvfs(parent)
    except FileNotFoundError as exc:
        raise UserError(f"cannot create {path}: {parent} does not exist") from exc
    free = vfs.f_bavail * vfs.f_frsize
    if mapped > free + current:
        raise UserError(
            f"not enough space for {path}: the image holds {human_bytes(mapped)}, "
            f"{human_bytes(free)} free on {parent}"
        )


def reread_partitions(fd: int) -> None:
    """Ask the kernel to re-read a disk's partition table (after repartitioning)."""
    fcntl.ioctl(fd, BLKRRPART)


def settle(timeout: float = 30.0) -> None:
    # The partition nodes appear asynchronously: udev creates them after the kernel's
    # uevent, so wait for the event queue to drain before using /dev/sdX1.
    run([which("udevadm"), "settle", f"--timeout={int(timeout)}"], timeout=timeout + 5)
