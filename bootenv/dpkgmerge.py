"""Merge a laid-out component's dpkg status paragraphs into the target's database.

The component archive carries /var/lib/bootenv/dpkg/<component>.status (its packages'
status paragraphs) and the packages' /var/lib/dpkg/info files as ordinary members. This
adds the paragraphs to /var/lib/dpkg/status: one replaces the package's paragraph, of
whatever architecture (but `Multi-Arch: same` ones of other architectures, which stay
beside it), a new one is added, and the file is kept sorted by package as dpkg keeps it,
so running it twice, or in another order, changes nothing. The file is replaced
atomically, keeping its owner and mode.

One paragraph is not replaced: a package the target already has on disk at another
version or architecture (a target that is not a clone of the gold). Its files there were
kept (the layout never overwrites; the component's differing ones are conflicts), so the
database must go on describing them.

The files are laid out without the package manager's lock, but the status file is
dpkg's database: the merge holds dpkg's locks (lock-frontend, then lock: fcntl locks, as
apt and dpkg take them) while it reads and replaces it, a few milliseconds, so an apt or
dpkg run meanwhile neither loses the component's packages nor has its own lost. A lock
held longer than LOCK_WAIT fails the component, retryably.

Both files are reached from the root without following a symlink (bootenv/atfd.py):
an archive may have placed one where the target had no /var/lib/dpkg yet, and the merge
refuses it rather than write outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bootenv.atfd import dir_under
from bootenv.dpkg import STATUS, parse_fields, parse_stanzas, render_status
from bootenv.errors import RetryableError
from bootenv.paxread import ArchiveError
from bootenv.split import COMPONENT_STATUS_DIR
from bootenv.writeback import replace_at

log = logging.getLogger(__name__)

# apt's lock, then dpkg's own: the order both take them in (dpkg's lib/dpkg/dbmodify.c).
DPKG_LOCKS = ("lock-frontend", "lock")
LOCK_WAIT = 600.0  # seconds an apt run may hold them before the component fails


def _key(stanza: str) -> tuple[str, str]:
    f = parse_fields(stanza)
    return f.get("package", ""), f.get("architecture", "")


def _on_disk_version(stanza: str) -> str | None:
    """The version of a package whose files are on disk (any state but not-installed
    and config-files), else None."""
    f = parse_fields(stanza)
    state = f.get("status", "").split()[2:3]
    return f.get("version", "") if state and state[0] not in ("not-installed", "config-files") else None


def _coinstallable(a: str, b: str) -> bool:
    """Two paragraphs of one package dpkg keeps side by side: both `Multi-Arch: same`,
    for two architectures. Any other two are one package installed once."""
    fa, fb = parse_fields(a), parse_fields(b)
    return fa.get("multi-arch") == fb.get("multi-arch") == "same" and fa.get("architecture", "") != fb.get(
        "architecture", ""
    )


def merged_status(current: str, incoming: str, kept: list[str] | None = None) -> str:
    """Pure: `current` with `incoming`'s paragraphs added or replaced, sorted by package
    and architecture as dpkg writes it: the result does not depend on the order in which
    components are merged (a re-run after a failure gives the file a clean run gives).

    An incoming paragraph takes the place of the package's paragraphs, of whatever
    architecture (a package that moved from `all` to `amd64` is listed once), but for
    the `Multi-Arch: same` ones of other architectures, which stay beside it. A package
    on disk at another version or architecture keeps its paragraph, and is named in
    `kept`: its files stayed, so the database must go on describing them."""
    stanzas = parse_stanzas(current)
    dropped: set[int] = set()
    by_name: dict[str, list[int]] = {}
    for i, stanza in enumerate(stanzas):
        by_name.setdefault(_key(stanza)[0], []).append(i)
    for stanza in parse_stanzas(incoming):
        key = _key(stanza)
        ships = parse_fields(stanza).get("version", "")
        rivals = [
            i
            for i in by_name.get(key[0], [])
            if i not in dropped and (_key(stanzas[i]) == key or not _coinstallable(stanzas[i], stanza))
        ]
        held = [
            (arch, version)
            for i in rivals
            if (version := _on_disk_version(stanzas[i])) is not None
            and ((arch := _key(stanzas[i])[1]) != key[1] or version != ships)
        ]
        if held:
            if kept is not None:
                (arch, have), name = held[0], key[0]
                if arch == key[1]:
                    kept.append(f"{name} {have} is installed, the component ships {ships}")
                else:
                    kept.append(
                        f"{name} {have} ({arch}) is installed, the component ships {ships} ({key[1]})"
                    )
            continue
        dropped.update(rivals)
        by_name.setdefault(key[0], []).append(len(stanzas))
        stanzas.append(stanza)
    return render_status(sorted((s for i, s in enumerate(stanzas) if i not in dropped), key=_key))


def read_at(dfd: int, name: str, rel: str) -> bytes | None:
    """File `name` in directory `dfd` (`rel`: its path from the root, for errors), not
    followed if it is a symlink (ArchiveError); None if missing."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _refused(exc, rel) from exc
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _read(dfd: int, name: str, rel: str) -> str | None:
    data = read_at(dfd, name, rel)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def _refused(exc: OSError, rel: str) -> OSError | ArchiveError:
    if exc.errno == errno.ELOOP:
        return ArchiveError(f"refused: /{rel} is a symlink")
    return exc


def merge_component_status(root: Path, component: str, kept: list[str] | None = None) -> list[str]:
    """Merge `component`'s paragraphs into ROOT's status; return its package names. The
    packages whose paragraphs stay as they were (another version is on disk) are logged,
    and named in `kept`. ArchiveError if a directory on the way is a symlink."""
    src_dir = COMPONENT_STATUS_DIR.lstrip("/")
    with dir_under(root, src_dir, create=False) as sfd:
        incoming = None if sfd is None else _read(sfd, f"{component}.status", f"{src_dir}/{component}.status")
    if incoming is None:
        log.info("%s: no dpkg status paragraphs in the archive", component)
        return []
    with dir_under(root, str(STATUS.parent), create=True) as dfd:
        assert dfd is not None
        with dpkg_locked(dfd):
            return _merge_into(dfd, component, incoming, kept)


@contextlib.contextmanager
def dpkg_locked(dfd: int, wait: float | None = None) -> Iterator[None]:
    """Hold dpkg's locks in its directory `dfd` (var/lib/dpkg), in dpkg's order; closing
    a lock file releases its lock. RetryableError if they stay taken for `wait` s."""
    wait = LOCK_WAIT if wait is None else wait
    deadline = time.monotonic() + wait
    fds: list[int] = []
    try:
        for name in DPKG_LOCKS:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640, dir_fd=dfd)
            except OSError as exc:
                raise _refused(exc, f"{STATUS.parent}/{name}") from exc
            fds.append(fd)
            _lock(fd, name, deadline, wait)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _lock(fd: int, name: str, deadline: float, wait: float) -> None:
    pause = 0.05
    told = False
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise RetryableError(
                f"dpkg's database stayed locked ({STATUS.parent}/{name}) for {wait:.0f} s:"
                " another package manager (apt, dpkg) is running"
            )
        if not told:
            log.info("waiting for dpkg's lock %s: another package manager is running", name)
            told = True
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, 1.0)


def _merge_into(dfd: int, component: str, incoming: str, kept: list[str] | None) -> list[str]:
    """Merge `incoming` into the status file in directory `dfd` (var/lib/dpkg)."""
    name = STATUS.name
    current = _read(dfd, name, str(STATUS))
    clashes: list[str] = []
    text = merged_status(current or "", incoming, clashes)
    for clash in clashes:
        log.warning("%s: dpkg database left as it was for %s", component, clash)
    if kept is not None:
        kept.extend(clashes)
    names = [_key(s)[0] for s in parse_stanzas(incoming)]
    if text == current:
        return names
    st = os.lstat(name, dir_fd=dfd) if current is not None else None
    replace_at(dfd, name, text.encode("utf-8", "surrogateescape"), like=st, tmp=".status.bootenv-tmp")
    os.fsync(dfd)  # the rename, before the journal records the merge
    log.info("%s: %d packages added to the dpkg database", component, len(names))
    return names
