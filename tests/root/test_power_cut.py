"""A power cut during a layout, on a real ext4: what is under a file's name is the whole file.

The cut is the filesystem's shutdown ioctl with its journal flushed and the dirty data
not (FS_IOC_SHUTDOWN, GOING_FLAGS_LOGFLUSH, as xfstests' `godown` does): the disk then
holds what a power cut a few seconds after the last write would leave, every time,
where waiting for a journal commit and copying the device only usually does.
"""

from __future__ import annotations

import fcntl
import io
import os
import struct
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bootenv.extract import TreeWriter
from bootenv.layout import LayoutConfig, layout
from bootenv.merge import MergeState
from bootenv.paxread import PaxReader
from bootenv.run import run
from tests.conftest import require_root, require_tools
from tests.hostile.kit import Comp, d, f, make_image, tar_bytes

_FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
_GOING_FLAGS_LOGFLUSH = 1


def make_ext4(image: Path) -> Path:
    with open(image, "wb") as fh:
        fh.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", image])
    return image


@contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    run(["mount", "-o", "loop", image, mountpoint])
    try:
        yield mountpoint
    finally:
        run(["umount", mountpoint])


def power_cut(mountpoint: Path) -> None:
    """Stop the filesystem as a power cut would: its journal on the disk, dirty data lost."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FS_IOC_SHUTDOWN, struct.pack("I", _GOING_FLAGS_LOGFLUSH))
    finally:
        os.close(fd)


def sparse(name: str, realsize: int, ranges: list[tuple[int, bytes]]) -> tarfile.TarInfo:
    """A GNU sparse 1.0 member, as `tar --sparse --format=posix` writes one."""
    entries = [str(len(ranges))] + [str(v) for off, data in ranges for v in (off, len(data))]
    header = ("\n".join(entries) + "\n").encode()
    member = f(
        f"GNUSparseFile.0/{name.rpartition('/')[2]}",
        header.ljust(512, b"\0") + b"".join(d for _, d in ranges),
    )
    member.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": f"./{name}",
        "GNU.sparse.realsize": str(realsize),
    }
    return member


def test_after_a_power_cut_a_file_is_whole_or_short_and_the_rerun_lays_it_out_whole(tmp_path: Path) -> None:
    """A file written in one pass reaches the disk with its size only as its data does:
    cut, it is short, and the re-run lays it out whole (sharedpaths._cut_short). A
    sparse file (a database's) is given its whole size first: renamed into place with its
    data still in the page cache, a power cut left it its full size, mode and mtime and
    nothing but holes; the re-run took it for a conflict, and the database started on
    zeros. Its data is now on the disk before its name is."""
    require_root()
    require_tools("mkfs.ext4", "mount", "e2fsck")
    ranges = [(0, b"PAGE0" * 13_000), (6 << 20, b"TAIL" * 16_000)]
    whole = bytes(range(256)) * (8 << 12)  # 2 MiB
    members = [
        d("var"),
        d("var/lib"),
        d("var/lib/mysql"),
        f("var/lib/mysql/aria_log.00000001", whole),
        sparse("var/lib/mysql/ibdata1", 8 << 20, ranges),
    ]
    want = bytearray(8 << 20)
    for off, data in ranges:
        want[off : off + len(data)] = data
    image = make_image(tmp_path / "img", [Comp("mysql", members)])
    fs, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with mounted(make_ext4(fs), mnt) as root:
        # The first run's stream places the files; the layout's syncs never come.
        writer = TreeWriter(root, "mysql", privileged=True, merge=MergeState(root))
        try:
            reader = PaxReader(io.BytesIO(tar_bytes(members)))
            for m in reader:
                writer.place(m, reader)
        finally:
            writer.close()
        power_cut(root)
    run(["e2fsck", "-fy", fs], check=False)
    with mounted(fs, mnt) as root:
        lib = root / "var/lib/mysql"
        assert whole.startswith((lib / "aria_log.00000001").read_bytes())
        assert (lib / "ibdata1").read_bytes() == want
        res = layout(LayoutConfig(str(image), ("mysql",), root), activator=lambda r, u: [])
        assert res.ok, res
        assert res.components[0].conflicts == ()
        assert (lib / "aria_log.00000001").read_bytes() == whole
        assert (lib / "ibdata1").read_bytes() == want
