"""`bootenv capture`: turn a gold machine's root tree into one composite image."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from bootenv import altmerge, readahead
from bootenv.alternatives import Shared
from bootenv.assign import check_claims, plan_split
from bootenv.blockmap import BlockMap, pack_image
from bootenv.cancel import Cancel
from bootenv.dpkg import (
    STATUS,
    Database,
    Diversion,
    read_database,
    read_diversions,
    render_status,
    version_key,
)
from bootenv.errors import FatalError, UserError
from bootenv.exclude import Exclusions
from bootenv.frames import TarSource, compress_tar
from bootenv.fsimage import (
    BLOCK_SIZE,
    check_ext4,
    image_size_for,
    in_memory,
    make_ext4,
    mem_available,
    scratch_image,
)
from bootenv.intree import disk_links, inside, resolve
from bootenv.log import Progress, step
from bootenv.manifest import MANIFEST, Blob, Component, Manifest, OsImage, RootFs, Source
from bootenv.mounts import check_kernel, restore_hidden, skipped_mounts
from bootenv.outdir import (
    check_replaceable,
    inside_root,
    new_partial,
    publishable,
    remove_leftovers,
    replace_dir,
)
from bootenv.run import run, which
from bootenv.split import COMPONENT_STATUS_DIR, OS, ComponentSpec, Split, assign_packages, validate_specs
from bootenv.staging import replace_file, stage
from bootenv.store import BlobWriter, write_blob
from bootenv.tarstream import finish_create, tar_create, write_list
from bootenv.walk import Entry, Kind, brief, exists_in, scan
from bootenv.writeback import fsync_dir, write_durably

log = logging.getLogger(__name__)

WANTS_DIR = "/etc/systemd/system/"
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
            return _pack_component(cfg, root, db, split, name, sizes, out, work, cancel, shared)
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
            os_image, rootfs = _pack_os(
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
        single, _ = _pack_os(cfg, root, db, split, regular, mounts, out, work, cancel, single=True)
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


def archive_order(root: Path, split: Split, image: str) -> list[str]:
    """A component's members for chunking: every directory first (parents before
    children), then the files, with each hard-linked group kept together."""
    dirs = sorted(set(split.dirs[image]))
    files = sorted(set(split.files[image]) - set(dirs))
    group: dict[tuple[int, int], str] = {}
    keyed = []
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path in files:
            key = path
            try:
                # Relative to ROOT's fd: ROOT/path may be longer than PATH_MAX.
                st: os.stat_result | None = os.lstat(path.lstrip("/"), dir_fd=top)
            except OSError:
                st = None  # vanished in a live capture: tar will say so
            if st is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = group.setdefault((st.st_dev, st.st_ino), path)
            keyed.append((key, path))
    finally:
        os.close(top)
    return dirs + [path for _, path in sorted(keyed)]


def _pack_component(
    cfg: CaptureConfig,
    root: Path,
    db: Database,
    split: Split,
    name: str,
    sizes: dict[str, int],
    out: Path,
    work: Path,
    cancel: Cancel,
    shared: tuple[Shared, ...] = (),
) -> Component:
    pkgs = split.packages(name)
    frag, status_rel = status_fragment(work, name, [db.packages[p].stanza for p in pkgs])
    alternatives = altmerge.fragment_file(frag, name, shared)
    listing = work / f"{name}.list"
    write_list(listing, archive_order(root, split, name))
    # The tar stream's size, about: a header and the data padded to 512 bytes, per file.
    total = sum(512 + -(-sizes.get(p, 0) // 512) * 512 for p in split.files[name])
    with step(f"Packing component {name} ({len(pkgs)} packages, {len(split.files[name])} files)"):
        extra = ((frag, "." + status_rel),) + (((frag, "." + alternatives),) if alternatives else ())
        tar = tar_create(root, listing, extra=extra)
        with cancel.running(tar), BlobWriter(out, "tar.zst") as blob:
            progress = Progress(f"packing {name}", total)
            src = cast(TarSource, tar.stdout)  # a pipe Popen opened: a BufferedReader
            raw, chunks = compress_tar(src, blob, level=cfg.level, progress=progress.update)
            progress.close()
            vanished = finish_create(tar)
            if status_rel in vanished:  # bootenv's own, in its work directory
                raise FatalError(f"{frag}{status_rel} vanished while it was packed")
            data = blob.finish(raw)
    _report_vanished(name, vanished)
    units = sorted(
        {p.rsplit("/", 1)[1] for p in split.files[name] if p.startswith(WANTS_DIR) and ".wants/" in p}
    )
    files = _packed(split.files[name], vanished)
    return Component(name, data, pkgs, split.depends[name], files, tuple(units), chunks)


def status_fragment(work: Path, name: str, stanzas: list[str]) -> tuple[Path, str]:
    """The tree (in `work`) of component `name`'s dpkg status paragraphs, and their path in
    it. A paragraph keeps any byte it had (read with surrogateescape): written back as
    those bytes, as dpkgmerge reads and writes them."""
    frag = work / f"frag-{name}"
    status_rel = f"{COMPONENT_STATUS_DIR}/{name}.status"
    (frag / status_rel.lstrip("/")).parent.mkdir(parents=True)
    (frag / status_rel.lstrip("/")).write_bytes(render_status(stanzas).encode("utf-8", "surrogateescape"))
    return frag, status_rel


def _packed(files: Iterable[str], vanished: tuple[str, ...]) -> int:
    """How many of `files` were packed: the ones a live machine did not remove meanwhile."""
    gone = set(vanished)
    return sum(1 for p in files if p not in gone)


def _report_vanished(image: str, paths: tuple[str, ...]) -> None:
    """A live machine removed these after the scan listed them: they are not in `image`."""
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        log.warning(
            "%s: %d path(s) removed while the capture read them, left out: %s", image, len(paths), shown
        )


def _pack_os(
    cfg: CaptureConfig,
    root: Path,
    db: Database,
    split: Split,
    regular: dict[str, int],
    mounts: tuple[Entry, ...],
    out: Path,
    work: Path,
    cancel: Cancel,
    *,
    single: bool,
    shared: tuple[Shared, ...] = (),
) -> tuple[OsImage, RootFs]:
    what = "single image" if single else "OS sub-image"
    images = list(split.files) if single else [OS]
    paths = sorted({p for i in images for p in (*split.dirs[i], *split.files[i])})
    staging = work / ("single" if single else "os")
    staging.mkdir()
    # mke2fs -d reads every file of the tree: the disk reads them ahead meanwhile.
    warm = readahead.plan([(p, regular[p]) for p in paths if p in regular], mem_available() // 4)
    with readahead.Readahead(root, warm):
        cancel.check()
        with step(f"Staging the {what} tree ({len(paths)} entries)"):
            staged = stage(root, paths, staging, work)
        log.info("Staged with %s", staged.method)
        _report_vanished("single" if single else OS, staged.vanished)
        staged_paths = set(paths)
        restore_hidden(root, staging, [m.path for m in mounts if m.path in staged_paths])
        if not single:
            check_kernel(root, staging, mounts)
            _rewrite_status(staging, db, split.packages(OS))
            altmerge.write_os_view(staging, shared)
        size = image_size_for(staged.used, staged.inodes)
        memory = in_memory(cfg.scratch, size, mem_available())
        with scratch_image(work / f"{staging.name}.img", memory=memory) as image:
            where = "in memory" if memory else "on disk"
            cancel.check()
            with step(f"Building the {what} ext4 filesystem ({size >> 20} MiB, {where})"):
                make_ext4(staging, image, size, staged.inodes)
            cancel.check()
            bmap, data = _compress_image(cfg, image, staging, out, what, cancel)
    bmap_blob = write_blob(out, "bmap.json", bmap.to_json().encode())
    pkgs = tuple(sorted(db.packages)) if single else split.packages(OS)
    nfiles = _packed((p for i in images for p in split.files[i]), staged.vanished)
    rootfs = RootFs(type="ext4", image_size=size, min_size=size, block_size=BLOCK_SIZE)
    return OsImage(data, bmap_blob, pkgs, nfiles), rootfs


def _compress_image(
    cfg: CaptureConfig, image: Path, staging: Path, out: Path, what: str, cancel: Cancel
) -> tuple[BlockMap, Blob]:
    """Compress the built image while e2fsck checks it and the staged tree is removed
    (unlinks on another thread: they overlap the compression)."""
    with ThreadPoolExecutor(1, thread_name_prefix="rmtree") as bg:
        removed = bg.submit(shutil.rmtree, staging)
        with cancel.running(check_ext4(image)) as fsck:  # killed on a failure, here or there
            with step(f"Compressing the {what}"), BlobWriter(out, "img.zst") as blob:
                bmap = pack_image(image, blob, block_size=BLOCK_SIZE, level=cfg.level)
                data = blob.finish(bmap.mapped)
            cancel.check()
            with step(f"Checking the {what} filesystem"):
                fsck.wait_ok()
        removed.result()
    return bmap, data


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


def _rewrite_status(staging: Path, db: Database, os_pkgs: tuple[str, ...]) -> None:
    """The OS image's dpkg status lists only the OS packages (and not-installed records)."""
    stanzas = [db.packages[p].stanza for p in os_pkgs] + list(db.other_stanzas)
    replace_file(staging, "/" + str(STATUS), render_status(stanzas).encode("utf-8", "surrogateescape"))


def count_kinds(entries: list[Entry]) -> dict[Kind, int]:
    counts: dict[Kind, int] = {}
    for e in entries:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return counts
