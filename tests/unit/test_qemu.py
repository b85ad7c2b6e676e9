"""The QEMU command line: TCG only, loopback-only forwards, netboot and UEFI."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv.errors import UserError
from bootenv.qemu import VmSpec, qemu_argv, sercon_file


def test_netboot_bios(tmp_path: Path) -> None:
    spec = VmSpec(
        console_log=tmp_path / "c.log",
        disk=tmp_path / "disk.img",
        netboot=True,
        tftp_dir=tmp_path / "tftp",
        bootfile="boot.ipxe",
        hostfwd=((8080, 80), (3307, 3306)),
    )
    argv = qemu_argv(spec)
    joined = " ".join(argv)
    assert "-enable-kvm" not in argv and argv[argv.index("-accel") : argv.index("-accel") + 2] == [
        "-accel",
        "tcg",
    ]
    assert "-boot n" in joined
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("user,id=n0,")  # user networking only: no tap, no bridge
    assert f"tftp={tmp_path / 'tftp'}" in netdev and "bootfile=boot.ipxe" in netdev
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in netdev and "hostfwd=tcp:127.0.0.1:3307-:3306" in netdev
    # The NIC boots first (OVMF follows bootindex, not -boot), then the disk.
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,bootindex=0" in argv
    assert "virtio-blk-pci,drive=d0,bootindex=1" in argv
    assert f"file={tmp_path / 'disk.img'},if=none,id=d0,format=raw,cache=unsafe" in argv
    assert "pflash" not in joined
    # SeaBIOS's serial console, where iPXE's BIOS ROM writes: its port's file beside the log.
    fw_cfg = argv[argv.index("-fw_cfg") + 1]
    assert fw_cfg == f"name=etc/sercon-port,file={tmp_path / 'c.log.sercon-port'}"
    assert sercon_file(spec) == tmp_path / "c.log.sercon-port"


def test_uefi_needs_firmware_and_vars(tmp_path: Path) -> None:
    spec = VmSpec(console_log=tmp_path / "c.log", firmware="uefi", uefi_vars=tmp_path / "vars.fd")
    with pytest.raises(UserError):
        qemu_argv(spec)
    argv = qemu_argv(spec, ovmf=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"))
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in argv
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}" in argv
    assert "-fw_cfg" not in argv  # OVMF's console is on the serial port already


def test_direct_kernel_boot(tmp_path: Path) -> None:
    spec = VmSpec(
        console_log=tmp_path / "c.log",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        append="console=ttyS0 bootenv.image=http://10.0.2.2:1/x",
    )
    argv = qemu_argv(spec)
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinuz")
    assert argv[argv.index("-append") + 1] == "console=ttyS0 bootenv.image=http://10.0.2.2:1/x"
    assert argv[argv.index("-initrd") + 1] == str(tmp_path / "initrd")
