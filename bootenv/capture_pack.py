"""Packing one sub-image of a capture (bootenv/capture.py plans the split and runs these).

A component is a tar of its files (directories first, each hard-linked group together)
with its dpkg status paragraphs beside them, compressed into chunks of one blob. The OS
sub-image, or the single image, is its tree staged (the OS sub-image's with the OS
packages' dpkg status, its view of the shared alternatives and the components' records
of them: altmerge.py), built as an ext4 filesystem in memory or on disk, and compressed
with its block map while e2fsck checks it. Paths a live machine removed after the scan are left out, and
named.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, cast

from bootenv import altmerge, readahead
from bootenv.alternatives import Shared
from bootenv.blockmap import BlockMap, pack_image
from bootenv.cancel import Cancel
from bootenv.dpkg import STATUS, Database, render_status
from bootenv.errors import FatalError
from bootenv.frames import TarSource, compress_tar
from bootenv.fsimage import (
    BLOCK_SIZE,
    check_ext4,
    image_size_for,
    in_memory,
    make_ext4,
    mem_available,
    scratch_image,
)
from bootenv.log import Progress, step
from bootenv.manifest import Blob, Component, OsImage, RootFs
from bootenv.mounts import check_kernel, restore_hidden
from bootenv.split import COMPONENT_STATUS_DIR, OS, Split
from bootenv.staging import replace_file, stage
from bootenv.store import BlobWriter, write_blob
from bootenv.tarstream import finish_create, tar_create, write_list
from bootenv.units import enabled_units
from bootenv.walk import Entry

if TYPE_CHECKING:  # a type only: capture imports this module
    from bootenv.capture import CaptureConfig

log = logging.getLogger(__name__)


def archive_order(root: Path, split: Split, image: str) -> list[str]:
    """A component's members for chunking: every directory first (parents before
    children), then the files, with each hard-linked group kept together."""
    dirs = sorted(set(split.dirs[image]))
    files = sorted(set(split.files[image]) - set(dirs))
    group: dict[tuple[int, int], str] = {}
    keyed = []
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path in files:
            key = path
            try:
                # Relative to ROOT's fd: ROOT/path may be longer than PATH_MAX.
                st: os.stat_result | None = os.lstat(path.lstrip("/"), dir_fd=top)
            except OSError:
                st = None  # vanished in a live capture: tar will say so
            if st is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = group.setdefault((st.st_dev, st.st_ino), path)
            keyed.append((key, path))
    finally:
        os.close(top)
    return dirs + [path for _, path in sorted(keyed)]


def pack_component(
    cfg: CaptureConfig,
    root: Path,
    db: Database,
    split: Split,
    name: str,
    sizes: dict[str, int],
    out: Path,
    work: Path,
    cancel: Cancel,
) -> Component:
    pkgs = split.packages(name)
    frag, status_rel = status_fragment(work, name, [db.packages[p].stanza for p in pkgs])
    listing = work / f"{name}.list"
    write_list(listing, archive_order(root, split, name))
    # The tar stream's size, about: a header and the data padded to 512 bytes, per file.
    total = sum(512 + -(-sizes.get(p, 0) // 512) * 512 for p in split.files[name])
    with step(f"Packing component {name} ({len(pkgs)} packages, {len(split.files[name])} files)"):
        tar = tar_create(root, listing, extra=((frag, "." + status_rel),))
        with cancel.running(tar), BlobWriter(out, "tar.zst") as blob:
            progress = Progress(f"packing {name}", total)
            src = cast(TarSource, tar.stdout)  # a pipe Popen opened: a BufferedReader
            raw, chunks = compress_tar(src, blob, level=cfg.level, progress=progress.update)
            progress.close()
            vanished = finish_create(tar)
            if status_rel in vanished:  # bootenv's own, in its work directory
                raise FatalError(f"{frag}{status_rel} vanished while it was packed")
            data = blob.finish(raw)
    _report_vanished(name, vanished)
    units = enabled_units(split.files[name], (p for paths in split.files.values() for p in paths))
    files = _packed(split.files[name], vanished)
    return Component(name, data, pkgs, split.depends[name], files, tuple(units), chunks)


def status_fragment(work: Path, name: str, stanzas: list[str]) -> tuple[Path, str]:
    """The tree (in `work`) of component `name`'s dpkg status paragraphs, and their path in
    it. A paragraph keeps any byte it had (read with surrogateescape): written back as
    those bytes, as dpkgmerge reads and writes them."""
    frag = work / f"frag-{name}"
    status_rel = f"{COMPONENT_STATUS_DIR}/{name}.status"
    (frag / status_rel.lstrip("/")).parent.mkdir(parents=True)
    (frag / status_rel.lstrip("/")).write_bytes(render_status(stanzas).encode("utf-8", "surrogateescape"))
    return frag, status_rel


def _packed(files: Iterable[str], vanished: tuple[str, ...]) -> int:
    """How many of `files` were packed: the ones a live machine did not remove meanwhile."""
    gone = set(vanished)
    return sum(1 for p in files if p not in gone)


def _report_vanished(image: str, paths: tuple[str, ...]) -> None:
    """A live machine removed these after the scan listed them: they are not in `image`."""
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        log.warning(
            "%s: %d path(s) removed while the capture read them, left out: %s", image, len(paths), shown
        )


def pack_os(
    cfg: CaptureConfig,
    root: Path,
    db: Database,
    split: Split,
    regular: dict[str, int],
    mounts: tuple[Entry, ...],
    out: Path,
    work: Path,
    cancel: Cancel,
    *,
    single: bool,
    shared: tuple[Shared, ...] = (),
) -> tuple[OsImage, RootFs]:
    what = "single image" if single else "OS sub-image"
    images = list(split.files) if single else [OS]
    paths = sorted({p for i in images for p in (*split.dirs[i], *split.files[i])})
    staging = work / ("single" if single else "os")
    staging.mkdir()
    # mke2fs -d reads every file of the tree: the disk reads them ahead meanwhile.
    warm = readahead.plan([(p, regular[p]) for p in paths if p in regular], mem_available() // 4)
    with readahead.Readahead(root, warm):
        cancel.check()
        with step(f"Staging the {what} tree ({len(paths)} entries)"):
            staged = stage(root, paths, staging, work)
        log.info("Staged with %s", staged.method)
        _report_vanished("single" if single else OS, staged.vanished)
        staged_paths = set(paths)
        restore_hidden(root, staging, [m.path for m in mounts if m.path in staged_paths])
        if not single:
            check_kernel(root, staging, mounts)
            _rewrite_status(staging, db, split.packages(OS))
            altmerge.write_os_view(staging, shared)
        size = image_size_for(staged.used, staged.inodes)
        memory = in_memory(cfg.scratch, size, mem_available())
        with scratch_image(work / f"{staging.name}.img", memory=memory) as image:
            where = "in memory" if memory else "on disk"
            cancel.check()
            with step(f"Building the {what} ext4 filesystem ({size >> 20} MiB, {where})"):
                make_ext4(staging, image, size, staged.inodes)
            cancel.check()
            bmap, data = _compress_image(cfg, image, staging, out, what, cancel)
    bmap_blob = write_blob(out, "bmap.json", bmap.to_json().encode())
    pkgs = tuple(sorted(db.packages)) if single else split.packages(OS)
    nfiles = _packed((p for i in images for p in split.files[i]), staged.vanished)
    rootfs = RootFs(type="ext4", image_size=size, min_size=size, block_size=BLOCK_SIZE)
    return OsImage(data, bmap_blob, pkgs, nfiles), rootfs


def _compress_image(
    cfg: CaptureConfig, image: Path, staging: Path, out: Path, what: str, cancel: Cancel
) -> tuple[BlockMap, Blob]:
    """Compress the built image while e2fsck checks it and the staged tree is removed
    (unlinks on another thread: they overlap the compression)."""
    with ThreadPoolExecutor(1, thread_name_prefix="rmtree") as bg:
        removed = bg.submit(shutil.rmtree, staging)
        with cancel.running(check_ext4(image)) as fsck:  # killed on a failure, here or there
            with step(f"Compressing the {what}"), BlobWriter(out, "img.zst") as blob:
                bmap = pack_image(image, blob, block_size=BLOCK_SIZE, level=cfg.level)
                data = blob.finish(bmap.mapped)
            cancel.check()
            with step(f"Checking the {what} filesystem"):
                fsck.wait_ok()
        removed.result()
    return bmap, data


def _rewrite_status(staging: Path, db: Database, os_pkgs: tuple[str, ...]) -> None:
    """The OS image's dpkg status lists only the OS packages (and not-installed records)."""
    stanzas = [db.packages[p].stanza for p in os_pkgs] + list(db.other_stanzas)
    replace_file(staging, "/" + str(STATUS), render_status(stanzas).encode("utf-8", "surrogateescape"))
