"""Resolve a path inside a root tree as a chroot of it would: an absolute symlink target
starts again at the tree's root and `..` stops there, so a path never leaves the tree.
A gold whose /var is a symlink to /data/var has its dpkg database in its own /data/var,
never in the host's (nor, on a live /, anywhere but where dpkg finds it)."""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path

from bootenv.errors import UserError

MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit

Readlink = Callable[[str], str | None]  # a tree path's symlink target, or None
Mode = Callable[[str], int | None]  # a tree path's lstat st_mode, or None if it is not there


def resolve(path: str, readlink: Readlink, *, last: bool = True) -> str:
    """`path` (absolute in the tree) with its symlinks resolved inside the tree; the last
    component too if `last`. Past MAX_LINK_HOPS links, a link is left as a component:
    a caller that opens the result must not follow it (O_NOFOLLOW)."""
    parts = [p for p in path.split("/") if p]
    done = ""
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            done = posixpath.dirname(done).rstrip("/")
            continue
        if part == ".":
            continue
        candidate = f"{done}/{part}"
        target = readlink(candidate) if (parts or last) and hops < MAX_LINK_HOPS else None
        if target is not None:
            hops += 1
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = ""
            continue
        done = candidate
    return done or "/"


def disk_links(root: Path) -> Readlink:
    """readlink() of the tree at `root` (remembered: a tree is resolved against one
    moment of it); None for a path that is not a symlink, or is not there."""
    top = str(root).rstrip("/")
    seen: dict[str, str | None] = {}

    def readlink(path: str) -> str | None:
        if path not in seen:
            try:
                seen[path] = os.readlink(top + path)
            except OSError:
                seen[path] = None
        return seen[path]

    return readlink


def inside(root: Path, path: str | os.PathLike[str], readlink: Readlink | None = None) -> Path:
    """ROOT/`path` (relative, or absolute in the tree), symlinks resolved inside ROOT."""
    rel = resolve("/" + os.fspath(path).lstrip("/"), readlink or disk_links(root))
    return root / rel.lstrip("/")


def in_target(root: Path, path: str, *, last: bool = True) -> Path:
    """ROOT/`path` for the agent, which reads, writes and removes in the OS image mounted
    at ROOT: resolved inside it afresh, as the booted system will resolve it; its last
    component too if `last` (a writer that replaces the entry passes False: a symlink
    there is replaced, never written through). A path the booted system could not use
    either is refused before anything goes through it: see usable."""
    top = str(root).rstrip("/")

    def mode_of(here: str) -> int | None:
        try:
            return os.lstat(top + here).st_mode
        except FileNotFoundError:
            return None

    return root / usable(path, disk_links(root), mode_of, last=last).lstrip("/")


def usable(path: str, readlink: Readlink, mode_of: Mode, *, last: bool = True) -> str:
    """`path` resolved in a tree (its links read by `readlink`, its entries' lstat modes
    by `mode_of`) as in_target resolves it, refused as the booted system could not use
    it: one that still leads through a symlink (a loop, past MAX_LINK_HOPS), or through
    something not a directory. Capture asks it of the image's tree before it is made."""
    want = "/" + path.lstrip("/")
    rel = resolve(want, readlink, last=last)
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts)):
        here = "/" + "/".join(parts[: i + 1])
        mode = mode_of(here)
        if mode is None:
            break  # made by the writer, as are the directories below it
        final = i == len(parts) - 1
        if stat.S_ISLNK(mode) and (last or not final):
            why = f"a symlink loop at {here} (more than {MAX_LINK_HOPS} links followed)"
        elif not final and not stat.S_ISDIR(mode):
            why = f"it leads to {rel}, and {here} is not a directory"
        else:
            continue
        raise UserError(
            f"the OS image's {want} cannot be resolved inside it: {why}",
            hint="fix that symlink on the gold machine and capture it again",
        )
    return rel
