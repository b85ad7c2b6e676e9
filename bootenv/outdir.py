"""Capture's output directory: built as a temp sibling, published whole, replacing an
earlier image only once the new one is complete.

Each temp sibling (`.NAME.partial-XXXXXXXX`, and `.NAME.old-PID` while an earlier image is
replaced) is locked (flock) by the capture that made it, for as long as it runs: one
that nobody holds was left by a capture killed midway (SIGKILL, a power cut), and the
next capture of NAME removes it. The kernel drops a dead process's locks, whatever PID
namespace it ran in. (On a filesystem without locks, none is removed.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bootenv.errors import UserError
from bootenv.manifest import MANIFEST

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB


def _temp_name(output: Path) -> re.Pattern[str]:
    """The names of `output`'s temp siblings (mkdtemp's 8 random characters; a PID)."""
    return re.compile(rf"\.{re.escape(output.name)}\.(partial-[a-z0-9_]{{8}}|old-[0-9]+)")


def remove_leftovers(output: Path) -> None:
    """Remove the temp siblings of `output` that no running capture holds."""
    try:
        names = sorted(os.listdir(output.parent))
    except FileNotFoundError:
        return
    pattern = _temp_name(output)
    for name in filter(pattern.fullmatch, names):
        path = output.parent / name
        try:
            fd = os.open(path, _DIR)
        except OSError:
            continue  # gone meanwhile, or not a directory: not one of ours
        try:
            fcntl.flock(fd, _LOCK)
        except OSError:  # a running capture's (or no locks on this filesystem: can't tell)
            os.close(fd)
            continue
        try:
            log.info("Removing %s, left by a capture that was stopped midway", path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def new_partial(output: Path, stack: ExitStack) -> Path:
    """A new temp sibling of `output`, locked until `stack` closes, which removes it."""
    while True:
        partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        fd = os.open(partial, _DIR)
        try:
            fcntl.flock(fd, _LOCK)
        except BlockingIOError:  # another capture took it for a leftover, and removes it
            os.close(fd)
            continue
        except OSError:  # no locks on this filesystem (NFS): none is removed as a leftover
            pass
        if os.fstat(fd).st_nlink == 0:  # one did, and has removed it already
            os.close(fd)
            continue
        stack.callback(os.close, fd)
        stack.callback(shutil.rmtree, partial, ignore_errors=True)  # (before the unlock)
        return partial


def inside_root(root: Path, output: Path) -> tuple[str, ...]:
    """Exclude the output (and its temp siblings) when it lies inside ROOT."""
    try:
        rel = output.parent.resolve().relative_to(root)
    except ValueError:
        return ()
    base = "/" + str(rel) if str(rel) != "." else ""
    return (
        f"{base}/{output.name}",
        f"{base}/{output.name}/*",
        f"{base}/.{output.name}.partial-*",
        f"{base}/.{output.name}.old-*",
    )


def check_replaceable(output: Path) -> None:
    """--force replaces an earlier image, or an empty directory: never anything else."""
    if output.is_symlink() or not output.is_dir():
        raise UserError(f"{output} exists and is not a directory", hint="choose another output")
    if not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise UserError(
            f"{output} is not a composite image (no {MANIFEST}): --force replaces only an image",
            hint="choose another output, or remove it yourself",
        )


def publishable(image: Path) -> None:
    """Give the image the modes the umask allows (its temp dir was made 0700 and its blobs
    0600): a web server running as its own user (nginx's www-data) must read it."""
    umask = os.umask(0)
    os.umask(umask)
    image.chmod(0o777 & ~umask)
    for child in image.iterdir():
        if child.is_file() and not child.is_symlink():
            child.chmod(0o666 & ~umask)


def replace_dir(new: Path, output: Path) -> None:
    """Rename `new` to `output`; an earlier image there is moved aside (locked, so no other
    capture takes it for a leftover while it is the only image), then removed."""
    if not output.exists():
        new.rename(output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    fd = os.open(output, _DIR)
    try:
        with contextlib.suppress(OSError):  # (held by the capture that made it; or no locks)
            fcntl.flock(fd, _LOCK)
        output.rename(old)
        try:
            new.rename(output)
        except BaseException:
            old.rename(output)  # the earlier image stays
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(fd)
