"""GNU tar as the file-level packer: exact modes, owners, xattrs, ACLs, links, devices.

Capture feeds tar a NUL-separated list of paths (no recursion), so the split decides
exactly which files go into which archive.

ACLs travel as the extended attributes they are (`system.posix_acl_access` and
`_default`, which `--xattrs-include=*` takes), never with `--acls`: that writes them
again as text (`SCHILY.acl.*`) naming each user and group by the name the capturing
host's passwd gives its id, whatever `--numeric-owner` says, and the gold's uid 33 may
be nobody, or someone else, where the image is laid out. The xattrs hold the ids. Nor
does the staging copy extract with `--acls`: tar then sets each entry's ACL after its
xattrs, from that text or, without it, from the mode, which would drop the ACL the
xattr had set.
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
    "--sparse",
    "--ignore-failed-read",  # a path that vanished is a warning: finish_create sorts them
    "--quoting-style=escape",  # how finish_create reads names (a build's default may differ)
)
EXTRACT_FLAGS = (
    "--extract",
    "--file=-",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--xattrs",
    "--xattrs-include=*",
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
    Wait for it with `finish_create`: its messages are in the C locale, to be read."""
    argv: list[str | Path] = [which("tar"), *CREATE_FLAGS, f"--directory={root}", f"--files-from={file_list}"]
    for directory, rel in extra:
        argv += [f"--directory={directory}", rel]
    return popen(argv, env={"LC_ALL": "C"})


def finish_create(tar: Stream) -> tuple[str, ...]:
    """Wait for `tar -c`; return the listed paths that vanished before tar read them.

    A live machine changes while it is read. A file that changed as tar read it (exit
    1) is archived as tar read it, and logged. A listed path that no longer exists
    (tar reads with --ignore-failed-read: a warning, exit 0) is left out, and returned.
    Any other failure to read an entry fails: tar would leave that file out too, and an
    image missing a file nobody removed is not the gold machine. Tar's other warnings
    (an extended attribute it could not read, as before) are logged."""
    err = tar.wait_ok(ok_codes=(0, 1))
    vanished, failed, notes = sort_warnings(err)
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise FatalError(f"tar could not read {failed[0]}{more}")
    for line in notes:
        log.warning("%s", line)
    return tuple(vanished)


_PROGRAM = re.compile(r"^\S*tar: ")  # tar names itself as it was run: /usr/bin/tar
_WARNING = ": Warning: "
_GONE_FROM = ("Cannot stat: ", "Cannot open: ", "Cannot readlink: ")
_GONE = ("No such file or directory", "Not a directory")
_METADATA = re.compile(r"^Cannot \w*(xattr|acl|filecon)\w*: ")  # tar warned of these before too
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def sort_warnings(err: str) -> tuple[list[str], list[str], list[str]]:
    """tar -c --ignore-failed-read's warnings, in the C locale, in three lists: the paths
    that vanished (unquoted); every other failure to read an entry, as "path: reason"
    ("Cannot stat", "open", "read", "savedir", "seek to", "readlink", and "Read error");
    and the lines that are neither, to be logged. A failure to read an entry's extended
    attributes, ACLs or SELinux label is a line to log: tar warned of those before
    --ignore-failed-read too, and packed the entry."""
    vanished, failed, notes = [], [], []
    for line in filter(None, (raw.strip() for raw in err.splitlines())):
        path, what = _warning(line)
        if path is not None and what.startswith(_GONE_FROM) and what.endswith(_GONE):
            vanished.append(path)
        elif path is not None and not _METADATA.match(what) and what.startswith(("Cannot ", "Read error")):
            failed.append(f"{path}: {what}")
        else:
            notes.append(line)
    return vanished, failed, notes


def _warning(line: str) -> tuple[str | None, str]:
    """(the path, unquoted, and what tar says of it) of a warning line; (None, "") else."""
    body = _PROGRAM.sub("", line, count=1)
    quoted, sep, what = body.partition(_WARNING)  # a quoted name has no bare ": "
    if not sep:
        return None, ""
    path = unquote(quoted).removeprefix(".")
    return path or "/", what


def unquote(name: str) -> str:
    """A name as tar quotes it in a message (C locale: a colon, a backslash and every
    byte that is not printable ASCII escaped), back to the path it names."""
    out = bytearray()
    i = 0
    raw = name.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i]
        if c != 0x5C or i + 1 == len(raw):  # not a backslash
            out.append(c)
            i += 1
            continue
        digits = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
        if digits:
            out.append(int(digits.group(), 8) & 0xFF)
            i += 1 + len(digits.group())
        else:
            out.append(_ESCAPES.get(chr(raw[i + 1]), raw[i + 1]))
            i += 2
    return out.decode("utf-8", "surrogateescape")


def tar_extract(dest: Path, stdin: int | None) -> Stream:
    """Start `tar -x` into `dest`, reading the archive from `stdin`."""
    return popen([which("tar"), *EXTRACT_FLAGS, f"--directory={dest}"], stdin=stdin, stdout=None)
