"""A component's systemd units: those its files enable, which a layout holds back until
the component is laid out (hold.py) and activation starts (activate.py).

A unit is enabled by a link in the `.wants/`, `.requires/` or `.upholds/` directory (the
last since systemd 249, `UpheldBy=`) of another unit under /etc/systemd/system
(multi-user.target.wants/mariadb.service: mariadb.service),
and a SysV service by a start link in a runlevel's directory (/etc/rc2.d/S01legacyd ->
../init.d/legacyd). systemd-sysv-generator makes the unit legacyd.service of such a
script at boot, unless a native unit of that name exists (then the script is passed
over, and the native unit is enabled its own way). The links are the component's:
a link whose target is a component's file goes with it (assign.py).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable
from pathlib import Path

UNIT_DIR = "/etc/systemd/system"
# The directories of a unit whose links enable other units (`systemctl enable` makes them).
ENABLING_SUFFIXES = (".wants", ".requires", ".upholds")
_ENABLING = re.compile(
    re.escape(UNIT_DIR) + r"/[^/]+(?:" + "|".join(map(re.escape, ENABLING_SUFFIXES)) + r")/([^/]+)"
)
# The runlevels systemd-sysv-generator starts services for (rc0.d and rc6.d stop them).
_START_LINK = re.compile(r"/etc/rc[1-5]\.d/S[0-9]{2}([^/]+)")
INIT_DIR = "/etc/init.d"
# Where a native unit is found on disk (systemd's system unit path, /run aside).
NATIVE_DIRS = frozenset(
    {UNIT_DIR, "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"}
)


def enabled_units(files: Iterable[str], tree: Iterable[str]) -> tuple[str, ...]:
    """The units a component's `files` enable, sorted. `tree`: every path of the gold
    tree (every sub-image's), where its init scripts and native units are looked up."""
    units: set[str] = set()
    sysv: set[str] = set()
    for path in files:
        if found := _ENABLING.fullmatch(path):
            units.add(found[1])
        elif found := _START_LINK.fullmatch(path):
            sysv.add(found[1])
    if sysv:
        scripts, native = set(), set()
        for path in tree:
            parent, _, name = path.rpartition("/")
            if parent == INIT_DIR:
                scripts.add(name)
            elif parent in NATIVE_DIRS:
                native.add(name)
        units |= {f"{name}.service" for name in sysv & scripts if f"{name}.service" not in native}
    return tuple(sorted(units))


def sysv_started(root: Path, unit: str) -> bool:
    """Whether SysV service `unit` (NAME.service) has a start link under ROOT
    (/etc/rc[1-5].d/SNNNAME): enabled, as a `.wants/` link enables a native unit."""
    name = unit.removesuffix(".service")
    return name != unit and any(root.glob(f"etc/rc[1-5].d/S[0-9][0-9]{glob.escape(name)}"))
