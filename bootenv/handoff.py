"""Leaving the ramdisk: kexec into the target's own kernel, or reboot.

`kexec_spec` is pure: it finds the target's kernel and initrd under its /boot and
builds the command line (root=UUID=..., plus the console= arguments the ramdisk was
booted with, so the target logs where the ramdisk did). `load` and `execute` do the
I/O; the kernel is loaded while the target is still mounted, and executed after it
was unmounted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from bootenv.cmdline import Handoff, shown, split_cmdline
from bootenv.dpkg import version_key
from bootenv.errors import FatalError, UserError
from bootenv.intree import in_target
from bootenv.run import run, which

log = logging.getLogger(__name__)

DEFAULT_CONSOLES = ("console=tty0", "console=ttyS0,115200n8")
INHERITED = ("console", "earlyprintk", "nomodeset")


@dataclass(frozen=True)
class KernelFiles:
    kernel: str  # path inside the target, e.g. /boot/vmlinuz-6.1.0-50-amd64
    initrd: str | None
    version: str


@dataclass(frozen=True)
class KexecSpec:
    kernel: Path  # on the mounted target
    initrd: Path | None
    cmdline: str


def find_kernel(root: Path) -> KernelFiles:
    """The newest kernel under the target's /boot, and its initrd if there is one: the
    target's symlinks resolved inside it, as its grub and its own system find them."""
    boot = _resolved(root, "/boot")
    names = [p.name for p in boot.glob("vmlinuz-*")] if boot else []
    versions = [n.removeprefix("vmlinuz-") for n in names if _is_file(root, f"/boot/{n}")]
    if not versions:
        raise FatalError("the OS image has no kernel in /boot (vmlinuz-*)", hint="install linux-image-*")
    version = max(versions, key=version_key)
    initrd = f"/boot/initrd.img-{version}"
    return KernelFiles(f"/boot/vmlinuz-{version}", initrd if _is_file(root, initrd) else None, version)


def _resolved(root: Path, path: str) -> Path | None:
    """The target's `path` (see intree.in_target); None if it cannot be resolved (a
    symlink loop), which neither grub nor the target's system could use either."""
    try:
        return in_target(root, path)
    except UserError:
        return None


def _is_file(root: Path, path: str) -> bool:
    found = _resolved(root, path)
    return found is not None and found.is_file()


def kernel_args(root_uuid: str, ramdisk_cmdline: str = "") -> tuple[str, ...]:
    """The target's kernel arguments: its root by UUID, and the ramdisk's consoles."""
    inherited = []
    for param, value in split_cmdline(ramdisk_cmdline):
        if param in INHERITED:
            inherited.append(param if value is None else f"{param}={value}")
    return (f"root=UUID={root_uuid}", "ro", *(inherited or DEFAULT_CONSOLES))


# What grub.cfg's `linux` line and kexec's --command-line cannot take in an argument they
# get unquoted: a space would split it; `;`, `|`, `&`, quotes, `$`, braces, `#` and `<>`
# mean something to grub.
_NOT_PASSED = re.compile(r"[\s;&|$\"'\\{}<>#`]")


def passed_on_problem(ramdisk_cmdline: str) -> str | None:
    """Why an argument the target inherits from `ramdisk_cmdline` cannot be passed on
    (None if all can): it must be printable ASCII, and take none of _NOT_PASSED."""
    for arg in kernel_args("", ramdisk_cmdline):
        if not (arg.isascii() and arg.isprintable()):
            return f"kernel argument {shown(arg)} is not printable ASCII"
        if _NOT_PASSED.search(arg):
            return f"kernel argument {shown(arg)} holds a space or a character grub.cfg cannot take"
    return None


def kexec_spec(root: Path, root_uuid: str, ramdisk_cmdline: str = "") -> KexecSpec:
    files = find_kernel(root)
    return KexecSpec(
        kernel=in_target(root, files.kernel),
        initrd=in_target(root, files.initrd) if files.initrd else None,
        cmdline=" ".join(kernel_args(root_uuid, ramdisk_cmdline)),
    )


def kexec_load_argv(spec: KexecSpec) -> list[str]:
    argv = ["kexec", "-l", str(spec.kernel), f"--command-line={spec.cmdline}"]
    if spec.initrd:
        argv.append(f"--initrd={spec.initrd}")
    return argv


def load(spec: KexecSpec) -> None:
    """Load the target kernel (while its filesystem is still mounted)."""
    argv = kexec_load_argv(spec)
    run([which("kexec"), *argv[1:]])


def execute(mode: Handoff) -> None:
    """Hand over: jump into the loaded kernel, or reboot. Does not return on success."""
    if mode is Handoff.KEXEC:
        log.info("kexec into the installed system")
        run([which("kexec"), "-e"])
        raise FatalError("kexec -e returned")
    if mode is Handoff.REBOOT:
        log.info("rebooting into the installed system")
        run([which("reboot"), "-f"])
