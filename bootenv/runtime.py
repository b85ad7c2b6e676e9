"""Bring bootenv's own Python runtime from the ramdisk into the target (/opt/bootenv).

A gold machine may have no Python at all, or another version without zstandard, so
the layout service must not use the target's. We copy the ramdisk's interpreter, its
standard library, bootenv and its dependencies, and every shared library they link
(found with ldd), including the dynamic loader. The unit runs the interpreter through
that loader with --library-path, so even the target's libc is not needed:

    /opt/bootenv/lib/ld-linux-x86-64.so.2 --library-path /opt/bootenv/lib \\
        /opt/bootenv/bin/python3 -m bootenv layout ...

The layout service removes /opt/bootenv once the layout succeeded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from bootenv.errors import FatalError
from bootenv.intree import in_target
from bootenv.run import run, which

log = logging.getLogger(__name__)

RUNTIME = "/opt/bootenv"
LOADER = "ld-linux-x86-64.so.2"
CA_BUNDLE = "ca-certificates.crt"  # in the runtime's directory
TARGET_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# bootenv and what it imports at run time; optional ones are copied when present.
PACKAGES = ("bootenv", "zstandard", "requests", "urllib3", "idna", "certifi", "charset_normalizer")
OPTIONAL = ("chardet", "cryptography", "cffi", "_cffi_backend", "six")
STDLIB_SKIP = (
    *("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"),
    *("site-packages", "dist-packages", "__phello__", "config-3*"),
)
_LDD = re.compile(r"^\s*(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)\s*$")


def python_argv(runtime: str = RUNTIME) -> list[str]:
    """The command that starts the bundled interpreter on the target."""
    return [
        f"{runtime}/lib/{LOADER}",
        "--library-path",
        f"{runtime}/lib",
        f"{runtime}/bin/python3",
        "-s",
    ]


def python_env(runtime: str = RUNTIME) -> dict[str, str]:
    return {
        "PYTHONHOME": runtime,
        "PYTHONPATH": f"{runtime}/site",
        "PYTHONDONTWRITEBYTECODE": "1",
        # The CA certificates the ramdisk trusted, brought along: certifi (Debian's)
        # names the system's bundle, which a gold without ca-certificates lacks.
        "REQUESTS_CA_BUNDLE": f"{runtime}/{CA_BUNDLE}",
        "SSL_CERT_FILE": f"{runtime}/{CA_BUNDLE}",
    }


def unit_environment(runtime: str = RUNTIME) -> str:
    return " ".join(f"{k}={v}" for k, v in python_env(runtime).items())


def parse_ldd(text: str) -> list[str]:
    """The absolute paths of the libraries in `ldd` output (all files' sections)."""
    out = []
    for line in text.splitlines():
        m = _LDD.match(line)
        if m:
            out.append(m.group(2))
    return out


def _copy_module(name: str, site: Path) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return False
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        # With its bytecode, where the source has it (the ramdisk compiles bootenv's, Debian
        # its packages'): the unit's Python may not write any, and compiling bootenv,
        # requests and urllib3 at every start costs seconds under emulation.
        shutil.copytree(origin.parent, site / name, symlinks=True)
    else:
        shutil.copy2(origin, site / origin.name)
    return True


def install_runtime(target: Path) -> Path:
    """Copy the running interpreter and bootenv into `target`/opt/bootenv, where the
    target's symlinks put it (a gold's /opt -> /srv/opt: `target`/srv/opt/bootenv)."""
    dest = in_target(target, RUNTIME, last=False)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif os.path.lexists(dest):
        dest.unlink()  # a file or symlink in its place: replaced, never followed
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib"
    site = dest / "site"
    site.mkdir()
    exe = Path(os.path.realpath(sys.executable))
    shutil.copy2(exe, dest / "bin/python3")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib, lib / stdlib.name, symlinks=False, ignore=shutil.ignore_patterns(*STDLIB_SKIP))
    for name in PACKAGES:
        if not _copy_module(name, site):
            raise FatalError(f"cannot bring {name} into the target: it is not importable here")
    for name in OPTIONAL:
        _copy_module(name, site)
    _copy_libraries(dest, [exe, *sorted(p for p in dest.rglob("*.so*") if p.is_file())])
    _copy_ca_bundle(target, dest / CA_BUNDLE)
    if not (lib / LOADER).exists():
        raise FatalError(f"the dynamic loader {LOADER} was not found by ldd")
    return dest


def _copy_ca_bundle(target: Path, dest: Path) -> None:
    """The CA certificates HTTPS is checked against in the layout service: those this
    ramdisk trusts (what it fetched the OS with), else the target's own; with neither,
    an empty bundle, so that HTTPS fails as untrusted, not as a missing file."""
    for bundle in _ca_bundles(target):
        if bundle.is_file() and bundle.stat().st_size:
            shutil.copyfile(bundle, dest)
            return
    log.warning("no CA certificates here or in the target: the layout service can use plain HTTP only")
    dest.write_bytes(b"")


def _ca_bundles(target: Path) -> Iterator[Path]:
    import certifi

    yield Path(certifi.where())
    yield in_target(target, TARGET_CA_BUNDLE)  # looked up only if this ramdisk has none


def _copy_libraries(dest: Path, elves: list[Path]) -> None:
    proc = run([which("ldd"), *elves], check=False)
    libs = sorted(set(parse_ldd(proc.stdout.decode(errors="replace"))))
    for path in libs:
        if path.startswith(str(dest)):
            continue
        name = Path(path).name
        target = dest / "lib" / name
        if not target.exists():
            shutil.copy2(os.path.realpath(path), target)
    log.info("runtime: %d shared libraries copied", len(libs))
