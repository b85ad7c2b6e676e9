"""Resolve a path inside a root tree as a chroot of it would: an absolute symlink target
starts again at the tree's root and `..` stops there, so a path never leaves the tree.
A gold whose /var is a symlink to /data/var has its dpkg database in its own /data/var,
never in the host's (nor, on a live /, anywhere but where dpkg finds it)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path

MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit

Readlink = Callable[[str], str | None]  # a tree path's symlink target, or None


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
