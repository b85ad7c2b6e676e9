"""GNU tar as the file-level packer: exact modes, owners, xattrs, ACLs, links, devices.

Capture feeds tar a NUL-separated list of paths (no recursion), so the split decides
exactly which files go into which archive.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from bootenv.errors import FatalError
from bootenv.run import Stream, popen, which

log = logging.getLogger(__name__)

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
    "--ignore-failed-read",  # a path that vanished is a warning: finish_create sorts them
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
    """Start `tar -c` of the listed paths of `root`, plus (directory, relpath) extras.
    Wait for it with `finish_create`."""
    argv: list[str | Path] = [which("tar"), *CREATE_FLAGS, f"--directory={root}", f"--files-from={file_list}"]
    for directory, rel in extra:
        argv += [f"--directory={directory}", rel]
    return popen(argv)


def finish_create(tar: Stream) -> tuple[str, ...]:
    """Wait for `tar -c`; return the listed paths that vanished before tar read them.

    A live machine changes while it is read. A file that changed as tar read it (exit
    1) is archived as tar read it, and logged. A listed path that no longer exists
    (tar read it with --ignore-failed-read: a warning, exit 0) is left out, and
    returned. Any other failure to read fails the capture: tar would leave that file out
    too, and an image missing a file nobody removed is not the gold machine."""
    err = tar.wait_ok(ok_codes=(0, 1))
    vanished, failed = sort_warnings(err)
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise FatalError(f"tar could not read {failed[0]}{more}")
    for line in err.splitlines():
        if line.strip() and _WARNING not in line:
            log.warning("%s", line.strip())
    return vanished


_PROGRAM = re.compile(r"^\S*tar: ")  # tar names itself as it was run: /usr/bin/tar
_WARNING = ": Warning: "
_VANISHED = ("No such file or directory", "Not a directory")


def sort_warnings(err: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """tar -c --ignore-failed-read's warnings: (the paths that vanished, every other
    failure to read, as "path: reason"). Paths are as tar quotes them, without its "./"."""
    vanished, failed = [], []
    for line in err.splitlines():
        body = _PROGRAM.sub("", line, count=1)
        path, sep, what = body.rpartition(_WARNING)
        if not sep:
            continue
        path = path.removeprefix(".")
        if what.endswith(_VANISHED) and what.startswith("Cannot "):
            vanished.append(path or "/")
        else:
            failed.append(f"{path or '/'}: {what}")
    return tuple(vanished), tuple(failed)


def tar_extract(dest: Path, stdin: int | None) -> Stream:
    """Start `tar -x` into `dest`, reading the archive from `stdin`."""
    return popen([which("tar"), *EXTRACT_FLAGS, f"--directory={dest}"], stdin=stdin, stdout=None)
