"""`bootenv capture`: turn a gold machine's root tree into one composite image.

This module checks the components it is given (or proposes them: --auto), stops the
services of --stop, scans ROOT and plans the split (refusing an image whose paths the
agent writes cannot be resolved inside it), then packs the sub-images at once
(the components on PACKERS threads beside the OS image: capture_pack.py packs each one)
into a temp directory that takes the output's place when all is written.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bootenv import altmerge
from bootenv.alternatives import Shared
from bootenv.assign import check_claims, plan_split
from bootenv.cancel import Cancel
from bootenv.capture_pack import pack_component, pack_os
from bootenv.dpkg import Database, Diversion, read_database, read_diversions, version_key
from bootenv.errors import FatalError, UserError
from bootenv.exclude import Exclusions
from bootenv.intree import Mode, Readlink, disk_links, inside, resolve
from bootenv.log import step
from bootenv.manifest import MANIFEST, Component, Manifest, Source
from bootenv.mounts import skipped_mounts
from bootenv.outdir import (
    check_replaceable,
    inside_root,
    new_partial,
    publishable,
    remove_leftovers,
    replace_dir,
)
from bootenv.run import run, which
from bootenv.split import OS, ComponentSpec, Split, assign_packages, validate_specs
from bootenv.target import check_tree
from bootenv.walk import Entry, Kind, brief, exists_in, scan
from bootenv.writeback import fsync_dir, write_durably

log = logging.getLogger(__name__)

PATH_MAX = 4096  # the longest path a system call takes, its NUL included (linux/limits.h)


@dataclass(frozen=True)
class CaptureConfig:
    root: Path
    output: Path
    components: tuple[ComponentSpec, ...] = ()
    auto: bool = False
    excludes: tuple[str, ...] = ()
    force: bool = False
    single: bool = False
    stop_services: tuple[str, ...] = ()
    level: int = 3
    scratch: str = "auto"  # where the OS image is built: auto, memory or disk (fsimage.in_memory)


@dataclass(frozen=True)
class CaptureResult:
    manifest: Manifest
    split: Split
    excluded: int


def capture(cfg: CaptureConfig) -> CaptureResult:
    """Plan the split, then pack every sub-image into a temp dir renamed into place."""
    root = cfg.root.resolve()
    if not root.is_dir():
        raise UserError(f"{cfg.root} is not a directory")
    output = cfg.output.absolute()
    if output.exists() or output.is_symlink():
        if not cfg.force:
            raise UserError(f"{output} already exists", hint="pass --force to replace it")
        check_replaceable(output)
    if cfg.stop_services and root != Path("/"):
        raise UserError("--stop only applies when capturing the live system (ROOT=/)")
    db = read_database(root)
    specs = cfg.components + (propose_components(db, cfg.components) if cfg.auto else ())
    if not specs:
        log.info("No components given: the image will hold the OS sub-image only")
    _refuse_bad_specs(root, db, specs)
    exclusions = Exclusions().with_patterns(cfg.excludes + inside_root(root, output))
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    with ExitStack() as stack:
        partial = new_partial(output, stack)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=partial))
        # Stopped before the scan: the files listed are the ones the stopped services left.
        with _quiesced(cfg.stop_services):
            with step(f"Scanning {root}"):
                entries = scan(root)
            split = plan_split(db, specs, entries, exclusions)
            split, shared = altmerge.plan(root, entries, split)
            _check_agent_paths(entries, split, single=cfg.single)
            for problem in split_warnings(specs, entries, read_diversions(root), split, exclusions):
                log.warning("%s", problem)
            try:
                manifest = _pack_all(cfg, root, db, split, entries, partial, work, shared=shared)
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise _too_long(root, exc) from exc
                raise
        shutil.rmtree(work)
        write_durably(partial / MANIFEST, manifest.to_json().encode())
        publishable(partial)
        fsync_dir(partial)
        replace_dir(partial, output)
        fsync_dir(output.parent)
    return CaptureResult(manifest, split, len(split.excluded))


def _refuse_bad_specs(root: Path, db: Database, specs: tuple[ComponentSpec, ...]) -> None:
    """Everything wrong with the components that needs no scan, refused before anything
    is written or stopped: names, packages, cycles between components, `/PATH`s."""
    validate_specs(specs, db)
    links = disk_links(root)
    for spec in specs:
        for path in spec.paths:
            # Where the gold finds it: its links resolved inside ROOT, none followed on
            # the host (a gold's /var -> /data/var is not the host's /data/var).
            if not exists_in(root, resolve(path, links, last=False)):
                raise UserError(f"component {spec.name}: {path} is not in {root}")
    package_owner, _, _ = assign_packages(db, specs)
    if any(spec.paths for spec in specs):
        check_claims(db, specs, package_owner, links)


def _check_agent_paths(entries: list[Entry], split: Split, *, single: bool) -> None:
    """Refuse a gold whose image the agent could not configure (target.check_tree): a
    path it writes (/etc/ssh, /opt/bootenv) that cannot be resolved inside the image, a
    symlink loop or a link through a file, which the agent finds only once the disk is
    written. Asked of the image's own tree, as staged from the scan: the OS sub-image's
    entries (and every sub-image's, for --single's image), so an excluded path or a
    component's does not count, and a mount point is the empty directory it is there."""
    by_path = {e.path: e for e in entries}
    for images in ((OS,), tuple(split.files)) if single else ((OS,),):
        check_tree(*_tree_view(by_path, {p for i in images for p in (*split.dirs[i], *split.files[i])}))


def _tree_view(by_path: dict[str, Entry], tree: set[str]) -> tuple[Readlink, Mode]:
    """readlink() and the lstat mode of the image holding the paths `tree`."""

    def readlink(path: str) -> str | None:
        e = by_path.get(path) if path in tree else None
        return e.target if e is not None and e.kind is Kind.SYMLINK else None

    def mode_of(path: str) -> int | None:
        e = by_path.get(path) if path in tree else None
        return None if e is None else _MODES.get(e.kind, stat.S_IFREG)

    return readlink, mode_of


_MODES = {Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}


def split_warnings(
    specs: tuple[ComponentSpec, ...],
    entries: list[Entry],
    diversions: tuple[Diversion, ...],
    split: Split,
    exclusions: Exclusions | None = None,
) -> list[str]:
    """What the image will carry that the admin may not expect (capture goes on):

    - a `/PATH` given to a component that is, or holds, a mount point: capture stays on
      ROOT's filesystem, so the mounted filesystem's contents are not in the image;
    - any other mount point that holds what the capture would take (/proc's contents are
      excluded anyway; the target makes its own ESP): left out as well;
    - a dpkg diversion made by a component's package: the diverting package's file and
      the diverted original (`to`) are in the sub-images the file rules give them, and
      dpkg's diversions list stays with the OS, so a target without that component still
      has the component's file where the original belongs (a split image cannot move a
      file of one sub-image aside when another is laid out).
    """
    out = skipped_mounts(specs, entries, exclusions or Exclusions())
    for d in diversions:
        owner = split.package_owner.get(d.package or "")
        if owner is None or owner == OS:
            continue
        where = split.image_of(d.path)
        if where != owner:
            out.append(
                f"dpkg diversion of {d.path} (to {d.to}) by {d.package}, of component {owner}: the "
                f"{where or 'no'} sub-image carries {d.package}'s {d.path}, so a target without {owner} "
                f"has it too; keep {d.package} in the OS, or remove the diversion on the gold"
            )
    return out


@contextmanager
def _quiesced(services: tuple[str, ...]) -> Iterator[None]:
    """Stop the listed services for a consistent capture; start again, after, the ones
    that were running (one the admin had stopped stays stopped)."""
    systemctl = which("systemctl") if services else ""
    running: list[str] = []
    try:
        for svc in services:
            active = run([systemctl, "is-active", "--quiet", svc], check=False).returncode == 0
            with step(f"Stopping {svc} for a consistent capture"):
                run([systemctl, "stop", svc])
            if active:
                running.append(svc)
            else:
                log.info("%s was not running: it is not started after the capture", svc)
        yield
    finally:
        for svc in reversed(running):
            done = run([systemctl, "start", svc], check=False)
            if done.returncode != 0:
                why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                log.warning("%s could not be started again: %s", svc, why[0])


def propose_components(db: Database, given: tuple[ComponentSpec, ...]) -> tuple[ComponentSpec, ...]:
    """`--auto`: one component per non-base package that ships a systemd service."""
    from bootenv.split import base_packages

    base = base_packages(db)
    taken = {p for s in given for p in s.packages} | {s.name for s in given}
    out = []
    for name in sorted(db.packages):
        if name in base or name in taken:
            continue
        if any(p.endswith(".service") and "/systemd/system/" in p for p in db.files.get(name, ())):
            out.append(ComponentSpec(name.replace("+", "-").replace(".", "-").lower(), (name,)))
    log.info("--auto proposes: %s", ", ".join(f"{s.name}={s.packages[0]}" for s in out) or "nothing")
    return tuple(out)


PACKERS = 2  # threads that pack components, each with its tar and zstd's own threads


def _pack_all(
    cfg: CaptureConfig,
    root: Path,
    db: Database,
    split: Split,
    entries: list[Entry],
    out: Path,
    work: Path,
    *,
    shared: tuple[Shared, ...] = (),
) -> Manifest:
    sizes = {e.path: e.size for e in entries}
    regular = {e.path: e.size for e in entries if e.kind is Kind.FILE}
    mounts = tuple(e for e in entries if e.mountpoint)
    names = sorted(n for n in split.files if n != OS)
    cancel = Cancel()

    def pack(name: str) -> Component:
        try:
            cancel.check()
            return pack_component(cfg, root, db, split, name, sizes, out, work, cancel)
        except BaseException as exc:
            cancel.set(exc)  # the OS side and the other packer stop at their next step
            raise

    # The components (tar and zstd: CPU) are packed on PACKERS threads while the OS image
    # is staged and built (mke2fs -d: mostly one core and the disk): they overlap. One
    # component's packing keeps about 1.3 cores busy (tar, the reads, the hash, zstd's
    # two threads), so with one packer the cores idled once the OS image was done. The
    # largest go first, so that the packers end together. A failure on any side stops
    # the others (their tar or e2fsck is killed) and is the one raised.
    order = sorted(names, key=lambda n: -sum(sizes.get(p, 0) for p in split.files[n]))
    with ThreadPoolExecutor(PACKERS, thread_name_prefix="pack") as pool:
        packing = {name: pool.submit(pack, name) for name in order}
        try:
            os_image, rootfs = pack_os(
                cfg, root, db, split, regular, mounts, out, work, cancel, single=False, shared=shared
            )
        except BaseException as exc:
            cancel.set(exc)
        wait(list(packing.values()))
    if cancel.cause is not None:
        raise cancel.cause
    components = [packing[name].result() for name in names]
    single = None
    if cfg.single:
        single, _ = pack_os(cfg, root, db, split, regular, mounts, out, work, cancel, single=True)
    return Manifest(_source(root, db), rootfs, os_image, tuple(components), single)


def _source(root: Path, db: Database) -> Source:
    def read(rel: str) -> str:
        try:
            return inside(root, rel).read_text(errors="replace").strip()
        except OSError:
            return ""

    release = ""
    for line in read("etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            release = line.partition("=")[2].strip('"')
    modules = inside(root, "lib/modules")
    kernels = sorted((p.name for p in modules.glob("*")), key=version_key) if modules.is_dir() else []
    arch = db.packages["dpkg"].arch if "dpkg" in db.packages else ""
    return Source(
        hostname=read("etc/hostname"),
        os_release=release,
        architecture=arch,
        kernel=kernels[-1] if kernels else "",
        captured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _too_long(root: Path, exc: OSError) -> FatalError:
    """ENAMETOOLONG in one line: a path of the gold with ROOT in front of it is longer than
    the one path argument the kernel takes (PATH_MAX), in a step that needs it whole (the
    OS image's staging). Named shortened: the whole would be a 4 KB line."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else ""
    prefix = str(root).rstrip("/")
    if not name.startswith(prefix + "/"):
        return FatalError(f"{brief(name)}: {exc.strerror}")
    inner = name[len(prefix) :]
    if len(os.fsencode(f"/g{inner}")) < PATH_MAX:
        hint = f"capture ROOT through a shorter path: mount --bind {root} /g; bootenv capture /g ..."
    else:
        hint = "leave it out with --exclude PATH"
    return FatalError(
        f"{brief(inner)} (in {root}): {exc.strerror}: {len(os.fsencode(name))} bytes with ROOT in front, "
        f"more than PATH_MAX ({PATH_MAX})",
        hint=hint,
    )


def count_kinds(entries: list[Entry]) -> dict[Kind, int]:
    counts: dict[Kind, int] = {}
    for e in entries:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return counts
