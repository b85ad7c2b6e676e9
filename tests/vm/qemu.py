"""A QEMU virtual machine for VM tests, as a context manager.

TCG only (KVM hangs on the build machines: see MACHINE_NOTES), serial console logged to a
file and reachable through a unix socket for typing, `wait_for(pattern)` with a timeout,
and the VM always killed on exit.

    with Qemu(QemuConfig(kernel=k, initrd=i, append="console=ttyS0", disks=(d,)), tmp) as vm:
        vm.wait_for(r"login:", timeout=120)
        vm.send("root\\n")
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bootenv.errors import UserError
from bootenv.ramdisk import Ramdisk, build_ramdisk
from bootenv.run import Stream, popen
from tests.conftest import require_root, require_tools

OVMF_CANDIDATES = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)


def cached_ramdisk() -> Ramdisk:
    """The netboot ramdisk, instant when cached, as any user. A build needs root,
    debootstrap, cpio and zstd: without them the test skips; with them, a build that
    fails is the test failing."""
    try:
        return build_ramdisk()
    except UserError:
        require_root()
        require_tools("debootstrap", "cpio", "zstd")
        raise


def ovmf() -> tuple[Path, Path]:
    """OVMF's code and variable-store templates (the ovmf package)."""
    for code, vars_ in OVMF_CANDIDATES:
        if code.exists() and vars_.exists():
            return code, vars_
    raise FileNotFoundError("OVMF firmware not found: install the ovmf package (`make deps`)")


class VmError(AssertionError):
    """The VM did not do what the test expected; the message ends with the console's tail."""


@dataclass(frozen=True)
class QemuConfig:
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[Path, ...] = ()  # raw images, attached as virtio disks in order
    memory_mib: int = 2048
    cpus: int = 2
    machine: str = "q35"
    net: bool = True
    netdev_options: str = ""  # appended to `-netdev user,id=n0`, e.g. ",tftp=DIR,bootfile=X"
    boot: str | None = None  # `-boot` order, e.g. "n" for network, "c" for disk
    uefi: bool = False  # OVMF instead of SeaBIOS
    extra: tuple[str, ...] = ()


def qemu_argv(cfg: QemuConfig, workdir: Path) -> list[str]:
    """The QEMU command line for `cfg`; serial output goes to workdir/serial.log."""
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        cfg.machine,
        "-smp",
        str(cfg.cpus),
        "-m",
        str(cfg.memory_mib),
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",  # a reboot ends QEMU: a boot loop shows up as a dead VM, not a hang
        "-chardev",
        f"socket,id=s0,path={workdir / 'serial.sock'},server=on,wait=off,logfile={workdir / 'serial.log'}",
        "-serial",
        "chardev:s0",
    ]
    if cfg.kernel:
        argv += ["-kernel", str(cfg.kernel)]
    if cfg.initrd:
        argv += ["-initrd", str(cfg.initrd)]
    if cfg.append:
        argv += ["-append", cfg.append]
    for disk in cfg.disks:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
    if cfg.net:
        argv += ["-netdev", f"user,id=n0{cfg.netdev_options}", "-device", "virtio-net-pci,netdev=n0"]
    else:
        argv += ["-nic", "none"]
    if cfg.boot:
        argv += ["-boot", cfg.boot]
    if cfg.uefi:
        argv += [
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={ovmf()[0]}",
            "-drive",
            f"if=pflash,format=raw,file={workdir / 'OVMF_VARS.fd'}",
        ]
    return argv + list(cfg.extra)


def have_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


class Qemu:
    """A running VM. Use as a context manager; it is killed on exit whatever happened."""

    def __init__(self, cfg: QemuConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.log_path = workdir / "serial.log"
        self._proc: Stream | None = None
        self._sock: socket.socket | None = None
        self._pos = 0  # wait_for searches from here: the end of the previous match
        self.started = 0.0

    def __enter__(self) -> Qemu:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        if self.cfg.uefi:
            shutil.copyfile(ovmf()[1], self.workdir / "OVMF_VARS.fd")
        self.started = time.monotonic()
        self._proc = popen(
            qemu_argv(self.cfg, self.workdir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._proc is not None:
            self._proc.kill()

    @property
    def console(self) -> str:
        """Everything the VM wrote to its serial console so far."""
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""
        # The guest's tty turns \n into \r\n; patterns should not have to care.
        return text.replace("\r\n", "\n")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.popen.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears after the previous match; return the match."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.console, self._pos)
            if m:
                self._pos = m.end()
                return m
            if not self.alive():
                code = self._proc.popen.returncode if self._proc else None
                raise VmError(f"QEMU exited ({code}) before /{pattern}/ appeared:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise VmError(f"/{pattern}/ did not appear within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def send(self, text: str) -> None:
        """Type `text` on the serial console."""
        if self._sock is None:
            self._sock = self._connect(timeout=10)
            # Once we are connected, QEMU also writes the console to the socket. Read it away
            # (the log file has it) so that a full socket buffer never stalls the guest.
            threading.Thread(target=self._drain, args=(self._sock,), daemon=True).start()
        self._sock.sendall(text.encode())

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.workdir / "serial.sock"))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline or not self.alive():
                    raise
                time.sleep(0.1)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
