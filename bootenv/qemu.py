"""QEMU virtual machines for the demo, benchmarks and VM tests (TCG, user networking).

`qemu_argv` is pure (a spec in, an argv out); `Vm` runs it as a context manager that
always kills QEMU, and reads the serial console log to wait for patterns.

Under SeaBIOS the console log holds iPXE's text too: iPXE's BIOS ROM writes to the
screen only, and a VM here has none, so SeaBIOS's serial console (sercon) takes the
screen's place on COM1. OVMF sends its console (iPXE's with it) to the serial port itself.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from bootenv.errors import FatalError, UserError
from bootenv.run import Stream, popen, which

log = logging.getLogger(__name__)

OVMF_CANDIDATES = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
)
# SeaBIOS reads its serial console's I/O port from this fw_cfg file: the port as a
# little-endian integer of the file's size (two bytes), COM1 here, where -serial goes.
SERCON_PORT = (0x3F8).to_bytes(2, "little")


@dataclass(frozen=True)
class VmSpec:
    console_log: Path
    disk: Path | None = None
    firmware: Literal["bios", "uefi"] = "bios"
    memory_mb: int = 2048
    cpus: int = 2
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    netboot: bool = False  # boot from the NIC with iPXE (-boot n)
    tftp_dir: Path | None = None
    bootfile: str | None = None
    mac: str = "52:54:00:12:34:56"
    hostfwd: tuple[tuple[int, int], ...] = ()  # (host port on 127.0.0.1, guest port)
    uefi_vars: Path | None = None  # a writable copy of OVMF_VARS, for firmware="uefi"
    extra: tuple[str, ...] = field(default_factory=tuple)


def sercon_file(spec: VmSpec) -> Path:
    """Where `Vm` writes SERCON_PORT for a SeaBIOS guest: beside its console log."""
    return spec.console_log.with_name(f"{spec.console_log.name}.sercon-port")


def ovmf_code() -> tuple[Path, Path]:
    for code, vars_ in OVMF_CANDIDATES:
        if Path(code).exists() and Path(vars_).exists():
            return Path(code), Path(vars_)
    raise UserError("OVMF firmware not found", hint="install the ovmf package (`make deps`)")


def qemu_argv(spec: VmSpec, qemu: str = "qemu-system-x86_64", ovmf: Path | None = None) -> list[str]:
    """The QEMU command line for a spec (TCG: /dev/kvm is not usable on our machines)."""
    # The default CPU model: with "-cpu max", zstd and OpenSSL pick AVX code paths that
    # TCG emulates slowly.
    argv = [qemu, "-machine", "q35", "-accel", "tcg", "-m", str(spec.memory_mb)]
    argv += ["-smp", str(spec.cpus), "-nodefaults", "-display", "none"]
    argv += ["-serial", f"file:{spec.console_log}", "-monitor", "none"]
    if spec.firmware == "uefi":
        if ovmf is None or spec.uefi_vars is None:
            raise UserError("UEFI needs OVMF code and a writable vars file")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf}"]
        argv += ["-drive", f"if=pflash,format=raw,unit=1,file={spec.uefi_vars}"]
    else:  # QEMU warns (on its stderr, which popen keeps) that the name is not opt/...
        argv += ["-fw_cfg", f"name=etc/sercon-port,file={sercon_file(spec)}"]
    netdev = "user,id=n0"
    if spec.tftp_dir is not None:
        netdev += f",tftp={spec.tftp_dir}"
    if spec.bootfile:
        netdev += f",bootfile={spec.bootfile}"
    for host, guest in spec.hostfwd:
        netdev += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
    # Boot order by bootindex, which SeaBIOS and OVMF both honour (OVMF ignores -boot, and
    # leaves out of its boot list any device without a bootindex once one has it).
    nic = f"virtio-net-pci,netdev=n0,mac={spec.mac}"
    if spec.netboot:
        nic += ",bootindex=0"
    argv += ["-netdev", netdev, "-device", nic]
    if spec.disk is not None:
        argv += ["-drive", f"file={spec.disk},if=none,id=d0,format=raw,cache=unsafe"]
        argv += ["-device", "virtio-blk-pci,drive=d0,bootindex=1"]
    if spec.netboot:
        argv += ["-boot", "n"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
    return argv + list(spec.extra)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers and QEMU host forwards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Vm:
    """A running VM; killed on exit whatever happened."""

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self._proc: Stream | None = None
        self._offset = 0
        self._seen = ""

    def __enter__(self) -> Vm:
        ovmf = None
        if self.spec.firmware == "uefi":
            ovmf = ovmf_code()[0]
        self.spec.console_log.write_bytes(b"")
        if self.spec.firmware == "bios":
            sercon_file(self.spec).write_bytes(SERCON_PORT)
        argv = qemu_argv(self.spec, which("qemu-system-x86_64"), ovmf)
        self._proc = popen(argv, stdout=None)
        self.started = time.monotonic()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.kill()

    def console(self) -> str:
        """All console output so far (decoded leniently)."""
        with open(self.spec.console_log, "rb") as f:
            f.seek(self._offset)
            self._seen += f.read().decode(errors="replace")
            self._offset = f.tell()
        return self._seen

    def alive(self) -> bool:
        return self._proc is not None and self._proc.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float, *, since: int = 0) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears on the console after offset `since`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.console(), since)
            if m:
                return m
            if not self.alive():
                raise FatalError(f"the VM exited before printing {pattern!r}: {self._tail()}")
            if time.monotonic() > deadline:
                raise FatalError(f"timed out after {timeout:.0f} s waiting for {pattern!r}: {self._tail()}")
            time.sleep(0.25)

    def _tail(self) -> str:
        lines = [ln for ln in self.console().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else "no console output"
