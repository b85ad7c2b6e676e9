"""Helpers for tests that look inside a composite image (independent of the writers)."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

from bootenv.blockmap import parse_blockmap
from bootenv.manifest import Manifest, OsImage, parse_manifest
from bootenv.run import run


def load(image_dir: Path) -> Manifest:
    return parse_manifest((image_dir / "manifest.json").read_text())


def restore_fs(image_dir: Path, os_image: OsImage, dest: Path) -> None:
    """Rebuild the ext4 image file from the range stream and the block map."""
    bmap = parse_blockmap((image_dir / os_image.blockmap.file).read_bytes())
    with open(image_dir / os_image.data.file, "rb") as src, open(dest, "wb") as out:
        out.truncate(bmap.image_size)
        reader = zstandard.ZstdDecompressor().stream_reader(src)
        for r in bmap.ranges:
            data = reader.read(r.length)
            while len(data) < r.length:
                more = reader.read(r.length - len(data))
                assert more, "stream ended early"
                data += more
            assert hashlib.sha256(data).hexdigest() == r.sha256
            os.pwrite(out.fileno(), data, r.offset)


@contextmanager
def mounted(fs_image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run(["mount", "-o", "loop,ro", fs_image, where])
    try:
        yield where
    finally:
        run(["umount", where])


def archive_members(path: Path) -> list[tarfile.TarInfo]:
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            return list(tar)


def describe(path: Path) -> tuple[object, ...]:
    """What must match between the gold and a restored file."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    detail: object = None
    if stat.S_ISREG(st.st_mode):
        detail = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        detail = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        detail = st.st_rdev
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail)


def tree_files(root: Path) -> dict[str, Path]:
    """Non-directory paths of a tree as '/etc/x' -> real path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            real = Path(dirpath) / name
            out["/" + str(real.relative_to(root))] = real
    return out
