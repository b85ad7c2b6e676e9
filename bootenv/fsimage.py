"""Build an ext4 filesystem image from a directory with `mke2fs -d` (no mount)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bootenv.run import Stream, popen, run, which

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MiB = 1 << 20


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) of a directory tree, not following links."""
    used = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            used += max(st.st_blocks * 512, BLOCK_SIZE)
    return used, inodes


SCRATCH_MODES = ("auto", "memory", "disk")


def in_memory(mode: str, size: int, available: int) -> bool:
    """Build an image of `size` bytes in memory? "auto": when that leaves at least half
    of the memory available now (pure)."""
    if mode not in SCRATCH_MODES:
        raise ValueError(f"scratch mode {mode!r}")
    return mode == "memory" or (mode == "auto" and 2 * size <= available)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextmanager
def scratch_image(fallback: Path, *, memory: bool) -> Iterator[Path]:
    """A path for a temporary image file, which child processes (mke2fs, e2fsck) can open.

    In memory, it is an anonymous memfd named through /proc: no tmpfs size limit applies,
    and the kernel frees it when this process ends, even by kill -9. On disk, it is
    `fallback`, removed at the end.
    """
    if memory:
        fd = os.memfd_create(fallback.name)
        try:
            yield Path(f"/proc/{os.getpid()}/fd/{fd}")
        finally:
            os.close(fd)
    else:
        try:
            yield fallback
        finally:
            fallback.unlink(missing_ok=True)


def image_size_for(used: int, inodes: int) -> int:
    """A size that fits the tree with room for ext4's metadata and the journal.

    The image is grown to fill its partition at provisioning time, so it stays small.
    """
    size = int(used * 1.15) + inodes * 256 + 192 * MiB
    return -(-size // MiB) * MiB


def make_ext4(tree: Path, image: Path, size: int, *, label: str = "bootenv-root") -> None:
    """Create `image` as an ext4 filesystem of `size` bytes populated from `tree`."""
    with open(image, "wb") as f:
        f.truncate(size)
    # lazy_itable_init keeps the image sparse: the kernel zeroes unused inode tables in
    # the background and never trusts them before that. The journal, though, is zeroed
    # here (lazy_journal_init=0): it becomes mapped data (zeros compress to nothing), so
    # a reused disk's stale journal blocks can never be replayed into the new filesystem.
    run(
        [
            which("mke2fs"),
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            str(BLOCK_SIZE),
            "-L",
            label,
            "-m",
            "1",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=0,nodiscard",
            "-d",
            tree,
            image,
            f"{size // 1024}k",
        ]
    )


def check_ext4(image: Path) -> Stream:
    """Start a read-only `e2fsck -fn` of `image`; the caller runs it alongside other work
    (capture compresses the image meanwhile) and calls `wait_ok()`."""
    return popen([which("e2fsck"), "-f", "-n", image], stdout=subprocess.DEVNULL)
