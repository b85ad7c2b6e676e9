"""Build component archives and composite images in Python, and snapshot trees.

Archives are pax tars (like `tar --format=posix`) compressed with zstd; the manifest is
minimal but valid. Shared by the unit, crash and hostile-archive tests.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from bootenv.frames import BLOCKS_OVER, VERIFY_BLOCK, compress_tar
from bootenv.manifest import Blob, Chunk, Component, Manifest, OsImage, RootFs, Source

MTIME = 1_700_000_000


class Entry(tarfile.TarInfo):
    """A TarInfo that carries its data along."""

    __slots__ = ("data",)


def f(
    name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0, **pax: str
) -> tarfile.TarInfo:
    ti = Entry("./" + name)
    ti.type = tarfile.REGTYPE
    ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, MTIME
    ti.data = data.encode() if isinstance(data, str) else data
    ti.size = len(ti.data)
    ti.pax_headers = dict(pax)
    return ti


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo("./" + name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, mode, uid, gid, MTIME
    return ti


def sym(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo("./" + name)
    ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, target, 0o777, MTIME
    return ti


def hard(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo("./" + name)
    ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.LNKTYPE, target, 0o644, MTIME
    return ti


def special(name: str, kind: bytes, major: int = 0, minor: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo("./" + name)
    ti.type, ti.mode, ti.mtime, ti.devmajor, ti.devminor = kind, 0o660, MTIME, major, minor
    return ti


def raw_name(ti: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """Give a member a name verbatim (no ./ prefix), e.g. an absolute or ../ name."""
    ti.name = name
    return ti


def tar_bytes(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti in members:
            data = ti.data if isinstance(ti, Entry) else None
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def blob(directory: Path, data: bytes, suffix: str, raw_size: int) -> Blob:
    sha = hashlib.sha256(data).hexdigest()
    (directory / f"{sha}.{suffix}").write_bytes(data)
    return Blob(f"{sha}.{suffix}", sha, len(data), raw_size)


@dataclass
class Comp:
    name: str
    members: list[tarfile.TarInfo]
    depends: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    packages: tuple[str, ...] = field(default_factory=tuple)
    status: str = ""  # dpkg status paragraphs; added as var/lib/bootenv/dpkg/<name>.status


def make_image(directory: Path, comps: list[Comp], *, chunk: int = 0, blocks: int = 0) -> Path:
    """A composite image of `comps`; with `chunk`, archives are cut into chunks of about
    that many tar bytes, as capture does (directories first, in their own chunk); with
    `blocks`, a chunk of more than 4 such blocks (compressed) pins each block of it."""
    directory.mkdir(parents=True, exist_ok=True)
    components = []
    for c in comps:
        members = list(c.members)
        if c.status:
            members.append(f(f"var/lib/bootenv/dpkg/{c.name}.status", c.status))
        chunks: tuple[Chunk, ...] = ()
        if chunk:
            members = sorted((m for m in members if m.isdir()), key=lambda m: m.name) + [
                m for m in members if not m.isdir()
            ]
            out = io.BytesIO()
            size, over = (blocks, 4 * blocks) if blocks else (VERIFY_BLOCK, BLOCKS_OVER)
            raw_size, chunks = compress_tar(
                io.BytesIO(tar_bytes(members)), out, level=3, target=chunk, block_size=size, block_min=over
            )
            data = blob(directory, out.getvalue(), "tar.zst", raw_size)
        else:
            raw = tar_bytes(members)
            data = blob(directory, zstandard.ZstdCompressor().compress(raw), "tar.zst", len(raw))
        components.append(Component(c.name, data, c.packages, c.depends, len(c.members), c.units, chunks))
    os_data = blob(directory, b"os", "img.zst", 2)
    bmap = blob(directory, b"{}", "bmap.json", 2)
    manifest = Manifest(
        Source("gold", "Debian", "amd64", "6.1", "2024-01-01T00:00:00Z"),
        RootFs("ext4", 1 << 20, 1 << 20, 4096),
        OsImage(os_data, bmap, ("base-files",), 1),
        tuple(components),
    )
    (directory / "manifest.json").write_text(manifest.to_json())
    return directory


def snapshot(
    root: Path, skip: tuple[str, ...] = ("var/lib/bootenv/layout",)
) -> dict[str, tuple[object, ...]]:
    """Every path under root: type, mode, owner, and bytes or link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            st = p.lstat()
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body)
    return out


def outside_listing(base: Path, root: Path) -> set[str]:
    """Everything under `base` except `root`'s subtree: to prove nothing escaped."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == root or root in Path(dirpath).parents:
            continue
        for n in dirnames + filenames:
            if Path(dirpath, n) != root:
                found.add(str(Path(dirpath, n).relative_to(base)))
    return found


class ActivatedUnits:
    """An activator for `layout(..., activator=)` that records the units it is given and
    activates nothing."""

    def __init__(self) -> None:
        self.units: list[str] = []

    def __call__(self, root: Path, units: list[str]) -> list[str]:
        self.units += units
        return []


class RefusingWriter:
    """A tree writer whose first placement fails (the target is full, say)."""

    stats = None

    def place(self, m: object, reader: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
