"""The console log of a SeaBIOS VM (bootenv/qemu.py) holds iPXE's text: its BIOS ROM
writes to the screen only, and SeaBIOS's serial console takes the screen's place."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv.qemu import SERCON_PORT, Vm, VmSpec, sercon_file
from tests.conftest import require_tools


def test_ipxe_writes_to_the_console_log_under_seabios(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64")
    if not Path("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists():
        pytest.skip("QEMU's iPXE ROMs are missing (ipxe-qemu)")
    tftp = tmp_path / "tftp"  # empty: iPXE starts, asks DHCP, finds no boot.ipxe
    tftp.mkdir()
    spec = VmSpec(console_log=tmp_path / "console.log", netboot=True, tftp_dir=tftp, bootfile="boot.ipxe")
    with Vm(spec) as vm:
        vm.wait_for(r"iPXE \S+ -- Open Source Network Boot Firmware", 60)
        assert sercon_file(spec).read_bytes() == SERCON_PORT
        vm.wait_for(r"Configuring \(net0 52:54:00:12:34:56\)", 60)
