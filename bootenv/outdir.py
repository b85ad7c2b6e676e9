"""Capture's output directory: built as a temp sibling, published whole, replacing an
earlier image only once the new one is complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bootenv.errors import UserError
from bootenv.manifest import MANIFEST


def inside_root(root: Path, output: Path) -> tuple[str, ...]:
    """Exclude the output (and its partial siblings) when it lies inside ROOT."""
    try:
        rel = output.parent.resolve().relative_to(root)
    except ValueError:
        return ()
    base = "/" + str(rel) if str(rel) != "." else ""
    return (f"{base}/{output.name}", f"{base}/{output.name}/*", f"{base}/.{output.name}.partial-*")


def check_replaceable(output: Path) -> None:
    """--force replaces an earlier image, or an empty directory: never anything else."""
    if output.is_symlink() or not output.is_dir():
        raise UserError(f"{output} exists and is not a directory", hint="choose another output")
    if not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise UserError(
            f"{output} is not a composite image (no {MANIFEST}): --force replaces only an image",
            hint="choose another output, or remove it yourself",
        )


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        new.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(output)
