"""Start what laid-out components bring, as their packages' postinst would have:
`ldconfig`, then on the running system the units (enabling those that came without an
enablement link), or, on a root that is not the running system, an offline enable.
Anything impossible here is skipped with a note, and a unit that does not start is
reported with its journal's last lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from bootenv.errors import BootenvError, UserError
from bootenv.run import run, which
from bootenv.units import ENABLING_SUFFIXES, sysv_started

log = logging.getLogger(__name__)

FAILED_UNIT = "failed to start: "  # activation note of a unit that is not active
QUEUED_UNIT = "start queued, once the boot is done: "  # ... whose start job still waits
START_WAIT = 300.0  # seconds `systemctl start` may take before its jobs are left queued


def activate(root: Path, units: list[str], *, live: bool | None = None) -> list[str]:
    """ldconfig, daemon-reload and units; anything impossible here is skipped with a note.

    `live`: `root` is the running system (by default: it is /, and systemd runs it).
    """
    if live is None:
        live = root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()
    if os.geteuid() != 0:
        return ["not root: ldconfig and systemctl skipped"]
    notes = [_ldconfig(root, live=live)]
    if not units:
        return notes
    try:
        systemctl = which("systemctl")
    except UserError:
        return [*notes, "systemctl not found: units not started"]
    # A component brings its units' enablement links as the gold machine had them (its
    # .wants/, .requires/ and .upholds/ symlinks and rc?.d links): `systemctl enable` is
    # only for a unit without one. Run for all, it redid them, and Debian's systemctl
    # then runs update-rc.d for each unit with an init script: 6.2 of the 9.9 s the
    # activation of LAMP took in a VM under TCG.
    missing = not_enabled(root, units)
    if not live:
        if missing:
            proc = run([systemctl, f"--root={root}", "enable", *missing], check=False)
            notes.append(
                f"enabled {' '.join(missing)} offline" if proc.returncode == 0 else "offline enable failed"
            )
        notes.append("not the running system: units start at next boot")
        return notes
    if missing:
        # Before the reload below, which then also sees the new links.
        proc = run([systemctl, "enable", "--no-reload", *missing], check=False)
        notes.append(f"enabled {' '.join(missing)}" if proc.returncode == 0 else "enable failed")
    run([systemctl, "daemon-reload"], check=False)
    _postinst_tools()
    waited = _start(systemctl, units)
    queued = _queued(systemctl, units) if waited else []
    for unit in queued:
        notes.append(f"{QUEUED_UNIT}{unit}")
    units = [u for u in units if u not in queued]
    if not units:
        return notes
    return notes + _states(systemctl, units)


def _ldconfig(root: Path, *, live: bool) -> str:
    try:
        run([which("ldconfig")] if live else [which("ldconfig"), "-r", root])
    except BootenvError as exc:
        return f"ldconfig skipped: {exc}"
    return "ldconfig done"


def _postinst_tools() -> None:
    """What a package's postinst would have done: the runtime directories (tmpfiles.d,
    e.g. /run/mysqld) and system users (sysusers.d) of the new files. Boot ran
    systemd-tmpfiles before the component's configuration existed."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        args = ["--create"] if tool == "systemd-tmpfiles" else []
        with contextlib.suppress(BootenvError):
            run([which(tool), *args], check=False)


def _start(systemctl: str, units: list[str]) -> bool:
    """Start the units; True if a start was left waiting (its jobs still queued).
    Sockets first, as at boot (sockets.target comes before multi-user.target): a
    socket refuses to start once its service is already running."""
    sockets = [u for u in units if u.endswith(".socket")]
    waited = False
    for batch in (sockets, [u for u in units if u not in sockets]):
        if batch:
            try:
                run([systemctl, "start", *batch], check=False, timeout=START_WAIT)
            except BootenvError:
                # Its jobs stay queued. A unit ordered after multi-user.target waits for
                # the boot to finish, which waits for this layout: it starts after it.
                log.warning("systemctl start %s still waiting after %.0f s", " ".join(batch), START_WAIT)
                waited = True
    return waited


def _states(systemctl: str, units: list[str]) -> list[str]:
    """A note per unit, started or not; a unit that is not active has its journal's
    last lines logged."""
    notes = []
    # One state per line, in the order asked; systemctl stops at a unit it cannot look
    # up, and those after it are asked one by one.
    states = run([systemctl, "is-active", *units], check=False).stdout.decode(errors="replace").split()
    for unit in units[len(states) :]:
        alone = run([systemctl, "is-active", unit], check=False).stdout.decode(errors="replace").split()
        states.append(alone[0] if alone else "unknown")
    for unit, state in zip(units, states, strict=False):
        if state in ("active", "reloading"):  # what `is-active --quiet` calls active
            notes.append(f"started {unit}")
            continue
        notes.append(f"{FAILED_UNIT}{unit}")
        # The unit's own words, where the admin watching the console will see them.
        try:
            journal = run(["journalctl", "-u", unit, "-n", "25", "--no-pager", "-o", "cat"], check=False)
        except BootenvError:
            continue
        for line in journal.stdout.decode(errors="replace").splitlines():
            log.warning("%s: %s", unit, line)
    return notes


def _queued(systemctl: str, units: list[str]) -> list[str]:
    """The units whose start job is still queued (none after a `start` that returned)."""
    try:
        out = run([systemctl, "show", "--property=Id,Job", *units], check=False).stdout
    except BootenvError:
        return []
    queued, unit = [], ""
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key == "Id":
            unit = value
        elif key == "Job" and value.strip() not in ("", "0") and unit in units:
            queued.append(unit)
    return queued


def not_enabled(root: Path, units: list[str]) -> list[str]:
    """The units with no enablement link under ROOT/etc/systemd/system (in a .wants,
    .requires or .upholds directory of some unit), nor a SysV service's start link (units.py)."""
    links = [d for d in (root / "etc/systemd/system").glob("*.*") if d.suffix in ENABLING_SUFFIXES]
    return [u for u in units if not (any(os.path.lexists(d / u) for d in links) or sysv_started(root, u))]
