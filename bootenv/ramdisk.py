"""Build the netboot ramdisk: a Debian kernel (vmlinuz) and a zstd cpio initramfs.

Two cached stages, both keyed by their inputs under `cache_root()`:

- `ramdisk-base-KEY/`: debootstrap of initramfs/packages.txt, trimmed (modules to
  initramfs/modules.txt and their closure, no docs or locales), packed as a zstd cpio, plus
  the kernel. The slow part (minutes); it depends on the two lists only.
- `ramdisk-KEY/`: vmlinuz and initramfs.img, which is the base archive followed by a small
  second zstd cpio holding /init and the bootenv package. The kernel unpacks concatenated
  archives in order, so a change to bootenv or init repacks only the small one (seconds).

Each stage is built in a temporary directory beside its final place and renamed into
place, so an interrupted build never leaves a half one behind.

`-o DIR` (what `bootenv serve --boot` and nginx serve) gets vmlinuz, initramfs.img and
ramdisk.json the same way, swapped in whole: bootenv/ramdisk_export.py.
"""

from __future__ import annotations

import compileall
import dataclasses
import logging
import os
import py_compile
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bootenv
from bootenv import ramdisk_export
from bootenv.cache import cache_root, prune
from bootenv.errors import FatalError, UserError
from bootenv.log import human_bytes, step
from bootenv.ramdisk_plan import (
    PYTHON_DIR,
    RamdiskInputs,
    base_key,
    cpio_list,
    drop_modules,
    drop_path,
    load_inputs,
    overlay_plan,
    parse_module_index,
    ramdisk_key,
    select_modules,
)
from bootenv.run import popen, run, which

log = logging.getLogger(__name__)

# Measured on the ramdisk tree (175 MB): -12 --long=24 gives 49 MB in 20 s; -19 gives 44 MB
# in 2-6 min on 2 cores. The kernel decompresses a 16 MiB window without trouble.
ZSTD_LEVEL = 12
# Every edit of bootenv makes a new (small, 50 MB) final build; keep only the latest few.
KEEP_BUILDS = 4
KEEP_BASES = 2
SIZE_LIMIT = 60 * 1000 * 1000


@dataclass(frozen=True)
class Ramdisk:
    vmlinuz: Path
    initramfs: Path
    kernel_version: str
    key: str
    cached: bool
    build: str | None = None  # its id in `-o DIR` (bootfiles.build_id), once exported there

    @property
    def size(self) -> int:
        return self.initramfs.stat().st_size


def default_initramfs_dir() -> Path:
    return Path(bootenv.__file__).resolve().parent.parent / "initramfs"


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temp dir beside `final`, renamed onto it on success and removed on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another build won the race; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "usr/lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        raise FatalError(f"expected one kernel in the ramdisk tree, found {versions}")
    return versions[0]


def _debootstrap(inputs: RamdiskInputs, tree: Path, mirror: str) -> None:
    debs = cache_root() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with step(f"debootstrap {inputs.suite} ({len(inputs.packages)} packages) from {mirror}"):
        run(
            [
                which("debootstrap"),
                "--variant=minbase",
                f"--include={','.join(inputs.packages)}",
                f"--cache-dir={debs}",
                inputs.suite,
                tree,
                mirror,
            ],
            timeout=3600,
        )


def _trim_modules(inputs: RamdiskInputs, tree: Path, version: str) -> None:
    moddir = tree / "usr/lib/modules" / version

    def read(name: str) -> str:
        path = moddir / name
        return path.read_text() if path.exists() else ""

    index = parse_module_index(
        read("modules.dep"), read("modules.softdep"), read("modules.alias"), read("modules.builtin")
    )
    sel = select_modules(index, inputs.modules)
    if sel.missing:
        log.warning("kernel %s has no modules %s; left out", version, ", ".join(sel.missing))
    if sel.builtin:
        log.info("built into the kernel: %s", ", ".join(sel.builtin))
    files = [p.relative_to(moddir).as_posix() for p in (moddir / "kernel").rglob("*.ko*")]
    for rel in drop_modules(files, sel.keep):
        (moddir / rel).unlink()
    for dirpath, _dirs, _files in sorted(os.walk(moddir / "kernel"), reverse=True):
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    log.info("kept %d of %d kernel modules", len(sel.keep), len(files))
    run(["chroot", tree, "depmod", "-a", version])


def _trim_tree(tree: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = os.path.relpath(dirpath, tree)
        for name in list(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = Path(dirpath) / name
            if drop_path(rel):
                if path.is_symlink():
                    path.unlink()
                else:
                    shutil.rmtree(path)
                dirnames.remove(name)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if drop_path(rel):
                (Path(dirpath) / name).unlink()


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def pack(root: Path, out: Path, *, level: int = ZSTD_LEVEL) -> None:
    """Write `root` as a zstd-compressed newc cpio archive, owned by root:root."""
    with tempfile.TemporaryFile() as names:
        names.write(("\n".join(cpio_list(root)) + "\n").encode())
        names.seek(0)
        cpio = popen(
            [which("cpio"), "--create", "--format=newc", "--owner=0:0", "--quiet"],
            stdin=names,
            cwd=root,
        )
        try:
            # --check adds a checksum that the kernel's decompressor verifies.
            comp = popen(
                [which("zstd"), "-q", f"-{level}", "--long=24", "-T0", "--check", "-f", "-o", out],
                stdin=cpio.stdout,
                stdout=None,
            )
        except BaseException:
            cpio.kill()
            raise
        # zstd holds the pipe now; closing ours lets cpio see SIGPIPE if zstd dies.
        cpio.stdout.close()
        try:
            comp.wait_ok()
            cpio.wait_ok()
        except BaseException:
            comp.kill()
            cpio.kill()
            raise


def build_base(inputs: RamdiskInputs, mirror: str | None = None) -> Path:
    """The cached base stage: vmlinuz, base.cpio.zst and kernel.txt."""
    final = cache_root() / f"ramdisk-base-{base_key(inputs)}"
    if (final / "base.cpio.zst").exists():
        log.info("Reusing cached ramdisk base %s", final)
        return final
    if os.geteuid() != 0:
        raise UserError("building the ramdisk base needs root (debootstrap, chroot)", hint="run as root")
    if mirror is None:
        from bootenv.gold import apt_mirror

        mirror = apt_mirror()
    with _staging(final) as out:
        tree = out / "tree"
        _debootstrap(inputs, tree, mirror)
        version = _kernel_version(tree)
        shutil.copy2(tree / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
        with step("Trimming the ramdisk tree"):
            before = _du(tree)
            _trim_modules(inputs, tree, version)
            _trim_tree(tree)
            log.info("tree trimmed from %s to %s", human_bytes(before), human_bytes(_du(tree)))
        with step(f"Packing the base archive (zstd -{ZSTD_LEVEL} --long=24)"):
            pack(tree, out / "base.cpio.zst")
        (out / "kernel.txt").write_text(version + "\n")
        shutil.rmtree(tree)
    _prune(final, KEEP_BASES)
    return final


def _write_overlay(inputs: RamdiskInputs, root: Path) -> None:
    for f in overlay_plan(inputs):
        path = root / f.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(f.data)
        path.chmod(f.mode)
    # Pre-compiled bytecode saves seconds of imports under emulation. Unchecked hashes
    # stay valid whatever mtimes the archive gives the sources. Only possible when the
    # ramdisk's Python (bookworm: 3.11) reads our bytecode format.
    if sys.version_info[:2] == (3, 11):
        compileall.compile_dir(
            root / PYTHON_DIR,
            quiet=1,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)


def build_ramdisk(
    inputs: RamdiskInputs | None = None,
    *,
    mirror: str | None = None,
    output: Path | None = None,
    trusted: Sequence[Path] = (),
) -> Ramdisk:
    """Return the cached kernel + initramfs for these inputs, building what is missing (root
    only). `trusted`: public keys (`bootenv keygen`'s KEY.pub) built in for the agent."""
    if output is not None:
        ramdisk_export.check_output(output)  # before a build of minutes
    inputs = inputs or load_inputs(default_initramfs_dir(), Path(bootenv.__file__).resolve().parent)
    if trusted:
        inputs = dataclasses.replace(inputs, trusted=trusted_keys(trusted))
    key = ramdisk_key(inputs)
    final = cache_root() / f"ramdisk-{key}"
    cached = (final / "initramfs.img").exists()
    if cached:
        log.info("Reusing cached ramdisk %s", final)
    else:
        base = build_base(inputs, mirror)
        with _staging(final) as out, step("Packing the ramdisk overlay (init, bootenv)"):
            _write_overlay(inputs, out / "overlay")
            pack(out / "overlay", out / "overlay.cpio.zst", level=9)
            shutil.rmtree(out / "overlay")
            with (out / "initramfs.img").open("wb") as img:
                for part in (base / "base.cpio.zst", out / "overlay.cpio.zst"):
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, img, 1 << 20)
            (out / "overlay.cpio.zst").unlink()
            shutil.copy2(base / "vmlinuz", out / "vmlinuz")
            shutil.copy2(base / "kernel.txt", out / "kernel.txt")
        _prune(final, KEEP_BUILDS)
    result = Ramdisk(
        vmlinuz=final / "vmlinuz",
        initramfs=final / "initramfs.img",
        kernel_version=(final / "kernel.txt").read_text().strip(),
        key=key,
        cached=cached,
    )
    if result.size > SIZE_LIMIT:
        log.warning("initramfs is %s, over the %s target", human_bytes(result.size), human_bytes(SIZE_LIMIT))
    if output is not None:
        result = ramdisk_export.export(result, output)
    return result


def trusted_keys(paths: Sequence[Path]) -> tuple[tuple[str, bytes], ...]:
    """Each key file's name and content, once it reads as a bootenv public key."""
    from bootenv.signing import read_public_key

    names = [p.name for p in paths]
    for p in paths:
        read_public_key(p)  # refuses what is not one
        if not p.name.endswith(".pub") or names.count(p.name) > 1:
            raise UserError(f"--trust {p}: each key needs a name of its own ending in .pub")
    return tuple(sorted((p.name, p.read_bytes()) for p in paths))


def _prune(current: Path, keep: int) -> None:
    """Remove all but the `keep` newest finished builds of the same stage as `current`
    (just built: the newest). The pattern matches `ramdisk-base-KEY` or `ramdisk-KEY`,
    not the other stage's names nor a staging dir's `.tmp-` ones."""
    stage, _, key = current.name.rpartition("-")
    for path in prune(current.parent, f"{stage}-{'?' * len(key)}", keep):
        log.debug("removed old ramdisk build %s", path.name)
