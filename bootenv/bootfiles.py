"""The ramdisk's builds in a `--boot DIR`: the one iPXE scripts name, what a request for
one that is gone is told, and which one `build-ramdisk -o DIR` keeps beside a new one.

`build-ramdisk -o DIR` (bootenv/ramdisk_export.py `export`) writes, and swaps in whole:

    vmlinuz, initramfs.img          the current build, for URLs that name none
    ramdisk.json                    {"build": ID, ...}
    ID/vmlinuz, ID/initramfs.img    the same two files (hard links), under the build's id
    PREV/vmlinuz, PREV/initramfs.img  the build before, kept until the next swap

A script serve makes names the current build (`BASE/boot/ID/vmlinuz`, then
`BASE/boot/ID/initramfs.img`), read once per script. A machine that fetches the kernel
just before a swap and the initramfs just after still gets the pair its script named:
the new DIR holds it as PREV. A build two swaps old is gone: its URLs are a 404 that says
so, and the script's retry fetches the script again, which names the current build.
Both builds are plain files under DIR, so nginx serves `/boot/ID/...` from the same
directory as serve does.

A DIR whose note names no build (the lab's cached build, a pair copied by hand, an older
bootenv's -o) is served as before, by URLs that name none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote

from bootenv.errors import UserError
from bootenv.menu import RAMDISK_INITRD, RAMDISK_KERNEL
from bootenv.smallfile import read_capped

PAIR = (RAMDISK_KERNEL, RAMDISK_INITRD)
NOTE = "ramdisk.json"
_BUILD = re.compile(r"[0-9a-f]{16}")
_MAX_NOTE = 64 * 1024


def build_id(kernel: bytes, initrd: bytes) -> str:
    """A build's id: 16 hex digits of a sha256 over its kernel's and initramfs's sha256."""
    return hashlib.sha256(kernel + initrd).hexdigest()[:16]


def noted(boot: Path) -> str | None:
    """The build DIR's note names as its current one, if it names one."""
    try:
        doc = json.loads(read_capped(boot / NOTE, _MAX_NOTE))
    except (OSError, UserError, ValueError, RecursionError):
        return None
    build = doc.get("build") if isinstance(doc, dict) else None
    return build if isinstance(build, str) and _BUILD.fullmatch(build) else None


def complete(boot: Path, build: str) -> bool:
    """Whether DIR/BUILD is a directory holding the build's two files, both regular files
    (no symlink: nginx would refuse it)."""
    try:
        return stat.S_ISDIR(os.lstat(boot / build).st_mode) and all(
            stat.S_ISREG(os.lstat(boot / build / name).st_mode) for name in PAIR
        )
    except OSError:
        return False


def current(boot: Path) -> str | None:
    """The build a script names: the note's, if DIR holds its pair; else None, and the
    script names no build."""
    build = noted(boot)
    return build if build is not None and complete(boot, build) else None


def gone(boot: Path, rel: str) -> str | None:
    """Why `/boot/REL` is a 404, when it names a build DIR no longer holds."""
    parts = unquote(rel).split("/")
    if len(parts) != 2 or not _BUILD.fullmatch(parts[0]) or parts[1] not in PAIR:
        return None
    if os.path.lexists(boot / parts[0]):
        return None  # served, or refused, as any other path
    return (
        f"ramdisk build {parts[0]} is neither the current build ({noted(boot) or 'unnamed'}) "
        "nor the one before it: build-ramdisk -o has replaced it since the script named it; "
        "fetch the script again"
    )


def is_build_dir(path: Path) -> bool:
    """Whether `path` in an -o DIR is a build's directory, which build-ramdisk wrote: named
    by an id, holding nothing but a pair's files."""
    if not _BUILD.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
        return False
    try:
        return set(os.listdir(path)) <= set(PAIR)
    except OSError:
        return False


def previous(output: Path, build: str) -> str | None:
    """The build `-o DIR` keeps beside the new one, `build`: the one DIR served until now;
    if that is `build` again, the one DIR kept before it."""
    try:
        names = os.listdir(output)
    except OSError:
        return None
    served = noted(output)
    kept = sorted(name for name in names if _BUILD.fullmatch(name) and name != served)
    for candidate in ([served] if served else []) + kept:
        if candidate != build and complete(output, candidate):
            return candidate
    return None
