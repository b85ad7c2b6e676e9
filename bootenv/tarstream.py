"""GNU tar as the file-level packer: exact modes, owners, xattrs, ACLs, links, devices.

Capture feeds tar a NUL-separated list of paths (no recursion), so the split decides
exactly which files go into which archive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bootenv.run import Stream, popen, which

CREATE_FLAGS = (
    "--create",
    "--file=-",
    "--null",
    "--no-recursion",
    "--numeric-owner",
    "--format=posix",
    "--pax-option=delete=atime,delete=ctime",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
)
EXTRACT_FLAGS = (
    "--extract",
    "--file=-",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--delay-directory-restore",
)


def write_list(path: Path, paths: Iterable[str]) -> int:
    """Write absolute tree paths as a NUL-separated tar file list; return the count."""
    count = 0
    with open(path, "wb") as out:
        for p in paths:
            out.write(b"." + os.fsencode(p) if p != "/" else b".")
            out.write(b"\0")
            count += 1
    return count


def tar_create(root: Path, file_list: Path, extra: tuple[tuple[Path, str], ...] = ()) -> Stream:
    """Start `tar -c` of the listed paths of `root`, plus (directory, relpath) extras."""
    argv: list[str | Path] = [which("tar"), *CREATE_FLAGS, f"--directory={root}", f"--files-from={file_list}"]
    for directory, rel in extra:
        argv += [f"--directory={directory}", rel]
    return popen(argv)


def tar_extract(dest: Path, stdin: int | None) -> Stream:
    """Start `tar -x` into `dest`, reading the archive from `stdin`."""
    return popen([which("tar"), *EXTRACT_FLAGS, f"--directory={dest}"], stdin=stdin, stdout=None)
