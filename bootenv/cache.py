"""The build cache outside the repository (~/.cache/bootenv), keyed by inputs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """Where debootstrap downloads and built trees are kept between runs."""
    env = os.environ.get("BOOTENV_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bootenv"


def input_key(inputs: object) -> str:
    """A short stable key for a JSON-serialisable description of a build's inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stale_builds(builds: Mapping[str, float], keep: int) -> list[str]:
    """Of finished builds (name -> mtime), all but the `keep` newest."""
    newest_first = sorted(builds, key=lambda name: (builds[name], name), reverse=True)
    return sorted(newest_first[keep:])


def prune(directory: Path, pattern: str, keep: int) -> list[Path]:
    """Remove all but the `keep` newest entries of `directory` that match `pattern` (a
    glob that only finished builds match): builds keyed by older versions of their
    inputs, hundreds of MB to GBs each, which would otherwise pile up with every change.
    The ones kept may still be in use by another checkout."""
    builds = {p.name: p.stat().st_mtime for p in directory.glob(pattern)}
    stale = [directory / name for name in stale_builds(builds, keep)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock on a cache entry while it is built (other builders wait)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
