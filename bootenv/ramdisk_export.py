"""`build-ramdisk -o DIR`: the kernel and initramfs bootenv/ramdisk.py built, exported to
the directory `bootenv serve --boot` and nginx serve (its layout: bootenv/bootfiles.py).

DIR gets vmlinuz, initramfs.img and ramdisk.json written to a new directory beside DIR,
which then takes DIR's place in one step (renameat2 RENAME_EXCHANGE). iPXE fetches the
kernel and the initramfs by fixed names, so two files renamed in turn could leave, after
a power cut between them, a new kernel with the old initramfs (its modules for another
kernel); a swapped directory holds either pair whole. The new directory also holds the
pair under the build's id (DIR/ID/), and the build before under its own, which serve's
scripts name (bootenv/bootfiles.py): a machine between its two fetches when DIR is
swapped gets the pair its script named. DIR is replaced whole, so it must hold nothing
else. Its files are 0644 and its directories 0755, whatever the umask and the cache's
modes: nginx's worker, not root, reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from bootenv import bootfiles
from bootenv.errors import UserError
from bootenv.writeback import fsync_dir, new_file, replace_dir, write_all

if TYPE_CHECKING:
    from bootenv.ramdisk import Ramdisk

log = logging.getLogger(__name__)

NOTE = bootfiles.NOTE
KERNEL, INITRD = bootfiles.PAIR
OUTPUT_FILES = (KERNEL, INITRD, NOTE)  # what `-o DIR` holds, besides its builds' dirs
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)  # a filesystem without hard links
_MOUNTED = (errno.EBUSY, errno.EXDEV)  # renaming a mount point, or across one
# Whatever the umask and the cache's modes: nginx's worker (www-data), not root, reads
# what `-o DIR` holds, and a file or directory it cannot read is a 403 to every machine.
PUBLIC_FILE, PUBLIC_DIR = 0o644, 0o755


def check_output(output: Path) -> None:
    """`-o DIR` is replaced whole (`export`): refuse one that holds anything an export
    does not write there (its three files, and its builds' directories holding nothing
    but a pair's files), which would be lost."""
    try:
        names = os.listdir(output)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot read -o {output}: {exc.strerror}") from exc
    ours = {*OUTPUT_FILES, *(f".{name}.tmp" for name in OUTPUT_FILES)}  # .tmp: an older bootenv's
    other = sorted(name for name in set(names) - ours if not bootfiles.is_build_dir(output / name))
    if other:
        raise UserError(
            f"-o {output} holds {len(other)} other entries (first {other[0]!r}): "
            "build-ramdisk replaces the whole directory",
            hint="give it a directory of its own",
        )


def export(ramdisk: Ramdisk, output: Path) -> Ramdisk:
    """Copy kernel and initramfs to `output` with a small JSON note, and link them under
    the build's id (`output/ID/`, bootfiles.build_id over the sha256s of the bytes copied), beside the
    build `output` served until now (`output/PREV/`, its files linked, not copied): all
    are written to a new directory beside `output`, which then takes its place in one
    step (writeback.replace_dir). Whatever a power cut, a full disk or a kill leaves, and
    whenever a reader (`bootenv serve --boot`, nginx) looks, `output` holds the old files
    or the new ones: never a new kernel with the old initramfs, which iPXE would boot.
    Where the filesystem cannot swap two directories (NFS), `output` is briefly missing
    instead. A machine between its two fetches when `output` is swapped fetched URLs
    that name its build, which the new `output` still holds (bootenv/bootfiles.py).
    `output` is replaced whole, so one that holds other files is refused."""
    check_output(output)
    dest = output
    try:
        _make_parents(output)
        with replace_dir(output, PUBLIC_DIR) as new:
            dest = output / KERNEL
            kernel = _write_temp(new / KERNEL, ramdisk.vmlinuz, None)
            dest = output / INITRD
            initrd = _write_temp(new / INITRD, ramdisk.initramfs, None)
            build = bootfiles.build_id(kernel, initrd)
            dest = output / build
            _link_pair(new, new / build)
            kept = bootfiles.previous(output, build)
            if kept:
                dest = output / kept
                _link_pair(output / kept, new / kept)
            info = {
                "build": build,
                "kernel": ramdisk.kernel_version,
                "key": ramdisk.key,
                "initramfs_size": ramdisk.size,
            }
            dest = output / NOTE
            _write_temp(new / NOTE, None, (json.dumps(info, indent=2) + "\n").encode())
            dest = output
    except OSError as exc:
        hint = "a mount point cannot be replaced: give a directory in it" if exc.errno in _MOUNTED else None
        raise UserError(f"cannot write {dest}: {exc.strerror}", hint=hint) from exc
    if kept:
        log.info("%s keeps the build before (%s) for machines between their two fetches", output, kept)
    return dataclasses.replace(ramdisk, vmlinuz=output / KERNEL, initramfs=output / INITRD, build=build)


def _link_pair(src: Path, dest: Path) -> None:
    """The directory `dest` with `src`'s kernel and initramfs, as hard links (both are
    beside `output`, on its filesystem); copies where the filesystem has none. Fsynced."""
    os.mkdir(dest, PUBLIC_DIR)
    for name in bootfiles.PAIR:
        try:
            os.link(src / name, dest / name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            _write_temp(dest / name, src / name, None)
            continue
        # The build before may have been exported under a umask that took some of it;
        # one another user exported stays as it was.
        if stat.S_ISREG(os.lstat(dest / name).st_mode):
            with contextlib.suppress(PermissionError):
                os.chmod(dest / name, PUBLIC_FILE)
    os.chmod(dest, PUBLIC_DIR)  # the umask took some of it
    fsync_dir(dest)


def _make_parents(output: Path) -> None:
    """`output`'s missing parent directories, each PUBLIC_DIR whatever the umask (nginx
    goes through them); those already there are the admin's."""
    missing = [p for p in output.absolute().parents if not p.exists()]
    for parent in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, PUBLIC_DIR)
            os.chmod(parent, PUBLIC_DIR)


def _write_temp(tmp: Path, src: Path | None, data: bytes | None) -> bytes:
    """`tmp`, made anew (writeback.new_file: one a killed run left is removed, never
    written through), with a copy of `src` or `data`, fsynced; removed again if that
    fails. Its mode is PUBLIC_FILE, not `src`'s (the cache's follow the umask). Returns
    the sha256 of what it wrote."""
    digest = hashlib.sha256()
    with new_file(tmp, PUBLIC_FILE) as fd:
        if src is not None:
            with src.open("rb") as f, os.fdopen(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(_Hashed(f, digest.update), out, 1 << 20)
        else:
            assert data is not None
            digest.update(data)
            write_all(fd, data)
        os.fchmod(fd, PUBLIC_FILE)  # the umask took some of it
    return digest.digest()


class _Hashed:
    """A reader that hands what it reads to `update` too (a digest's): the build's id is
    of the bytes written, read once."""

    def __init__(self, f: BinaryIO, update: Callable[[bytes], object]) -> None:
        self.f, self.update = f, update

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.update(data)
        return data
