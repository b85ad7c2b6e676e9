"""Hold a component's systemd units back until the component is laid out.

A component brings its units' enablement links (multi-user.target.wants/...) among its
first files. If the layout is cut short (a power cut, a kill), the next boot would start
those units from a half-laid-out component while the resumed layout runs, and what they
create meanwhile (a database's files) would stay: the layout never overwrites, so the
image's own versions would end up as conflicts. So before any file of a component is
placed, each of its units gets a drop-in

    /etc/systemd/system/<unit>.d/bootenv-hold-<component>.conf
    [Unit]
    ConditionPathExists=!/var/lib/bootenv/layout/held/<component>

and the flag file it names, made durable together. Once the component is laid out, and
before its units are started, the flag goes, then the drop-ins. A component that failed
stays held: its units start once a layout of it succeeds, or the admin removes its flag.
Every directory is reached without following a symlink (bootenv/atfd.py), as the
dpkg merge's are: a component may have planted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from bootenv.atfd import dir_under
from bootenv.merge import STATE
from bootenv.writeback import replace_at, sync_filesystem

log = logging.getLogger(__name__)

HELD_DIR = STATE / "held"
UNIT_DIR = Path("etc/systemd/system")
# systemd's unit names (unit_name_is_valid): no "/", so a name stays in its directory.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.[a-z]{3,9}")


def drop_in_name(component: str) -> str:
    return f"bootenv-hold-{component}.conf"


def drop_in_text(component: str) -> str:
    return (
        f"# Written by bootenv: started only once the component {component} is laid out.\n"
        "[Unit]\n"
        f"ConditionPathExists=!/{HELD_DIR}/{component}\n"
    )


def holdable(units: tuple[str, ...]) -> list[str]:
    """The units a hold can name (a drop-in directory each); others are logged."""
    good = [u for u in units if _UNIT_NAME.fullmatch(u)]
    for unit in sorted(set(units) - set(good)):
        log.warning("%r is not a systemd unit name: not held back during the layout", unit)
    return good


def hold(root: Path, held: dict[str, tuple[str, ...]]) -> None:
    """Hold back each component's units (`held`: component -> units), durably, before
    the layout places any of its files."""
    held = {c: tuple(holdable(units)) for c, units in held.items()}
    held = {c: units for c, units in held.items() if units}
    if not held:
        return
    with dir_under(root, HELD_DIR, create=True) as flags:
        assert flags is not None  # made if missing
        for component in held:
            replace_at(flags, component, b"", like=None, tmp=f".{component}.tmp", sync=False)
        for component, units in held.items():
            for unit in units:
                with dir_under(root, UNIT_DIR / f"{unit}.d", create=True) as dfd:
                    assert dfd is not None
                    body = drop_in_text(component).encode()
                    tmp = ".bootenv-hold.tmp"
                    replace_at(dfd, drop_in_name(component), body, like=None, tmp=tmp, sync=False)
        # The files, their names and the new directories: one flush of the filesystem.
        sync_filesystem(flags)
    log.info("held back until laid out: %s", ", ".join(u for units in held.values() for u in units))


def release(root: Path, component: str, units: tuple[str, ...]) -> None:
    """Let the component's units start: its flag goes (durably), then its drop-ins."""
    with dir_under(root, HELD_DIR, create=False) as flags:
        if flags is None:
            return
        try:
            os.unlink(component, dir_fd=flags)
        except FileNotFoundError:
            return  # not held (an older layout's run, or released already)
        os.fsync(flags)
    for unit in holdable(units):
        with dir_under(root, UNIT_DIR / f"{unit}.d", create=False) as dfd:
            if dfd is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(drop_in_name(component), dir_fd=dfd)
        with dir_under(root, UNIT_DIR, create=False) as units_fd, contextlib.suppress(OSError):
            if units_fd is not None:
                os.rmdir(f"{unit}.d", dir_fd=units_fd)  # only if nothing else is in it
