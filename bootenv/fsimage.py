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
    Each inode's table entry (256 bytes) is counted: make_ext4 gives the image at least
    as many inodes as the tree has.
    """
    size = int(used * 1.15) + inodes * 256 + 192 * MiB
    return -(-size // MiB) * MiB


# One inode per 16 KiB: mke2fs's default density (/etc/mke2fs.conf inode_ratio).
INODE_RATIO = 16384
RESERVED_INODES = 11  # ext4's first 10 inodes (the root's among them), and lost+found


def inode_count(size: int, inodes: int) -> int:
    """The inodes an image of `size` bytes gets, for a tree of `inodes` (fsimage.tree_usage
    counts them: every one but the tree's root, each hard-linked inode once).

    mke2fs's own choice (by size alone) fails on a tree of many small files ("Could not
    allocate inode"): the tree's count, a margin on top, wins then. Never fewer than the
    default density either: resize2fs keeps the inodes per group when provisioning grows
    the image, so the grown filesystem has as many inodes as a default one of its size.
    """
    return max(size // INODE_RATIO, inodes + inodes // 100 + RESERVED_INODES + 64)


def make_ext4(tree: Path, image: Path, size: int, inodes: int, *, label: str = "bootenv-root") -> None:
    """Create `image` as an ext4 filesystem of `size` bytes populated from `tree`, which
    holds `inodes` inodes (as tree_usage counts them)."""
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
            "-N",
            str(inode_count(size, inodes)),
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
