"""The pure half of the ramdisk builder: inputs, cache keys, module closure, trim rule, file plans.

Nothing here starts a process; `bootenv.ramdisk` applies these plans.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bootenv.cache import input_key
from bootenv.errors import UserError

# Bump when the build steps change in a way the inputs do not show.
BUILDER_VERSION = 1

PYTHON_DIR = "usr/lib/python3/dist-packages"
TRUSTED_DIR = "etc/bootenv/trusted"  # the agent's built-in signing keys (bootenv/agent.py)


@dataclass(frozen=True)
class RamdiskInputs:
    """Everything a ramdisk is built from; the cache keys hash exactly this."""

    suite: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    modules_load: tuple[str, ...]
    init: bytes
    udhcpc_script: bytes
    # (path relative to the package's parent, content), sorted: e.g. ("bootenv/cli.py", b"...").
    sources: tuple[tuple[str, bytes], ...]
    # Signing keys the agent trusts (file name, bootenv public key), in etc/bootenv/trusted/.
    trusted: tuple[tuple[str, bytes], ...] = ()


def parse_list(text: str) -> tuple[str, ...]:
    """One name a line; `#` starts a comment; blank lines are ignored."""
    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return tuple(names)


def package_sources(package_dir: Path) -> tuple[tuple[str, bytes], ...]:
    """The Python package's source files (no caches), keyed by `<package>/<relpath>`."""
    found = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if not path.is_file() or "__pycache__" in rel.parts or path.suffix in {".pyc", ".pyo"}:
            continue
        found.append((f"{package_dir.name}/{rel.as_posix()}", path.read_bytes()))
    return tuple(found)


def load_inputs(initramfs_dir: Path, package_dir: Path, *, suite: str = "bookworm") -> RamdiskInputs:
    """Read initramfs/ (init, udhcpc.script, the .txt lists) and the package sources."""
    try:
        return RamdiskInputs(
            suite=suite,
            packages=parse_list((initramfs_dir / "packages.txt").read_text()),
            modules=parse_list((initramfs_dir / "modules.txt").read_text()),
            modules_load=parse_list((initramfs_dir / "modules-load.txt").read_text()),
            init=(initramfs_dir / "init").read_bytes(),
            udhcpc_script=(initramfs_dir / "udhcpc.script").read_bytes(),
            sources=package_sources(package_dir),
        )
    except FileNotFoundError as exc:
        raise UserError(f"ramdisk input missing: {exc.filename}") from exc


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_key(inputs: RamdiskInputs) -> str:
    """Key of the slow part (debootstrap, trim, compress): packages and modules only."""
    trim = [DROP_DIRS, sorted(KEEP), DROP_SUFFIXES]  # the trim rules shape the base too
    return input_key(
        {
            "v": BUILDER_VERSION,
            "suite": inputs.suite,
            "pkgs": inputs.packages,
            "mods": inputs.modules,
            "trim": trim,
        }
    )


def ramdisk_key(inputs: RamdiskInputs) -> str:
    """Key of the finished kernel + initramfs: the base plus init, scripts and bootenv sources."""
    return input_key(
        {
            "base": base_key(inputs),
            "load": inputs.modules_load,
            "init": _sha(inputs.init),
            "udhcpc": _sha(inputs.udhcpc_script),
            "sources": [[name, _sha(data)] for name, data in inputs.sources],
            # Only when there are keys: a ramdisk without any keeps the key it had.
            **({"trusted": [[n, _sha(d)] for n, d in inputs.trusted]} if inputs.trusted else {}),
        }
    )


# --- kernel modules -------------------------------------------------------------------------


def module_name(path: str) -> str:
    """`kernel/fs/nls/nls_iso8859-1.ko.xz` -> `nls_iso8859_1` (the kernel treats - as _)."""
    base = PurePosixPath(path).name
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleIndex:
    """What depmod wrote about a kernel's modules, parsed."""

    deps: Mapping[str, tuple[str, ...]]  # module path -> paths it needs
    by_name: Mapping[str, str]  # module name -> path
    softdeps: Mapping[str, tuple[str, ...]]  # module name -> names or aliases loaded with it
    aliases: Mapping[str, tuple[str, ...]]  # exact alias -> module names
    builtin: frozenset[str]  # names built into the kernel


def parse_module_index(
    modules_dep: str, softdep: str = "", alias: str = "", builtin: str = ""
) -> ModuleIndex:
    deps: dict[str, tuple[str, ...]] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod.strip()] = tuple(rest.split())
    by_name = {module_name(p): p for p in deps}
    soft: dict[str, list[str]] = {}
    for line in softdep.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        targets = [w for w in words[2:] if w not in {"pre:", "post:"}]
        soft.setdefault(words[1].replace("-", "_"), []).extend(targets)
    aliases: dict[str, list[str]] = {}
    for line in alias.splitlines():
        words = line.split()
        # Wildcard aliases match hardware, not names we ask for; only exact ones help here.
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
    return ModuleIndex(
        deps=deps,
        by_name=by_name,
        softdeps={k: tuple(v) for k, v in soft.items()},
        aliases={k: tuple(v) for k, v in aliases.items()},
        builtin=frozenset(module_name(p) for p in builtin.split()),
    )


@dataclass(frozen=True)
class ModuleSelection:
    keep: tuple[str, ...]  # module paths (relative to lib/modules/VER) to keep, sorted
    builtin: tuple[str, ...]  # asked-for names that are built into the kernel
    missing: tuple[str, ...]  # asked-for names this kernel does not have


def select_modules(index: ModuleIndex, wanted: Iterable[str]) -> ModuleSelection:
    """The wanted modules plus everything modprobe would load with them (deps and softdeps)."""
    keep: set[str] = set()
    builtin: list[str] = []
    missing: list[str] = []

    def resolve(name: str) -> list[str]:
        norm = name.replace("-", "_")
        if norm in index.by_name:
            return [norm]
        return [m for m in index.aliases.get(name, ()) if m in index.by_name]

    def add(name: str) -> None:
        path = index.by_name[name]
        if path in keep:
            return
        keep.add(path)
        for dep in index.deps.get(path, ()):
            add(module_name(dep))
        for soft in index.softdeps.get(name, ()):
            for found in resolve(soft):
                add(found)

    for name in wanted:
        found = resolve(name)
        if found:
            for mod in found:
                add(mod)
        elif name.replace("-", "_") in index.builtin:
            builtin.append(name)
        else:
            missing.append(name)
    return ModuleSelection(keep=tuple(sorted(keep)), builtin=tuple(builtin), missing=tuple(missing))


# --- trimming -------------------------------------------------------------------------------

# Whole directories the ramdisk never reads. Paths are relative to the tree root.
DROP_DIRS = (
    "boot",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bug",
    "usr/share/common-licenses",
    "usr/share/zsh",
    "usr/share/bash-completion",
    "usr/lib/x86_64-linux-gnu/gconv",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf",
    "var/cache/man",
    "var/log",
    # udev's hardware database names vendors and models; nothing here looks them up.
    "usr/lib/udev/hwdb.d",
    # Prebuilt netboot/CD EFI images; grub-install builds its own from the modules.
    "usr/lib/grub/x86_64-efi/monolithic",
    # Python's test suite, IDE, GUI toolkit and installers.
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/turtledemo",
)
# Files inside the kept directories that are stale copies or leftovers.
DROP_SUFFIXES = (".dpkg-old", ".dpkg-bak", ".dpkg-dist", "-old")


# Kept inside dropped directories: mtools (the agent fills the ESP with it) converts
# names through code page 850, and fails with "Cannot initialize" without these.
KEEP = frozenset(
    "usr/lib/x86_64-linux-gnu/gconv/" + name
    for name in ("gconv-modules", "gconv-modules.cache", "IBM850.so", "IBM437.so")
)


def drop_path(rel: str) -> bool:
    """True if the ramdisk does not need this path (relative to the root, POSIX)."""
    if rel in KEEP or rel.startswith("usr/lib/x86_64-linux-gnu/gconv/gconv-modules.d"):
        return False
    for d in DROP_DIRS:
        if rel == d or rel.startswith(d + "/"):
            # Keep the directories themselves (empty) so that tools which write there work.
            return rel != d
    if rel in {"usr/lib/udev/hwdb.bin", "etc/udev/hwdb.bin"}:
        return True
    if rel.startswith("usr/lib/modules/") and rel.endswith("/build"):
        return True  # a dangling symlink to the headers
    return rel.endswith(DROP_SUFFIXES) and not rel.startswith("usr/lib/modules/")


def drop_modules(module_files: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Of all module files (relative to lib/modules/VER), those not kept."""
    kept = set(keep)
    return sorted(f for f in module_files if f not in kept)


# --- files in the archives ------------------------------------------------------------------


def cpio_list(root: Path) -> list[str]:
    """Every path under root, relative (`.` first), sorted so a directory precedes its contents."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            paths.append(name if rel == "." else f"{rel}/{name}")
    # A parent is a prefix of its children, so plain string order puts it first.
    return [".", *sorted(paths)]


@dataclass(frozen=True)
class OverlayFile:
    path: str  # relative to the ramdisk root
    data: bytes
    mode: int


def _lines(names: tuple[str, ...]) -> bytes:
    return "".join(f"{n}\n" for n in names).encode()


def overlay_plan(inputs: RamdiskInputs) -> tuple[OverlayFile, ...]:
    """The files laid over the base tree: init, its helpers, and the bootenv package."""
    files = [
        OverlayFile("init", inputs.init, 0o755),
        OverlayFile("etc/bootenv/udhcpc.script", inputs.udhcpc_script, 0o755),
        OverlayFile("etc/bootenv/modules", _lines(inputs.modules), 0o644),
        OverlayFile("etc/bootenv/modules-load", _lines(inputs.modules_load), 0o644),
        OverlayFile("etc/hostname", b"bootenv-ramdisk\n", 0o644),
    ]
    files += [OverlayFile(f"{PYTHON_DIR}/{name}", data, 0o644) for name, data in inputs.sources]
    files += [OverlayFile(f"{TRUSTED_DIR}/{name}", data, 0o644) for name, data in inputs.trusted]
    return tuple(sorted(files, key=lambda f: f.path))
