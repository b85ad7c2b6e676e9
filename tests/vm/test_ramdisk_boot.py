"""Boot the built ramdisk in QEMU (TCG) and check, on the serial console, what a user would.

The ramdisk is built (or taken from the cache) by `bootenv.ramdisk.build_ramdisk`, which
needs root and debootstrap. Timeouts are generous: under TCG on a busy 2-core machine the
kernel takes 6-20 s to reach /init, and every Python start costs seconds.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from bootenv.ramdisk import SIZE_LIMIT, Ramdisk
from bootenv.run import run
from tests.vm.qemu import Qemu, QemuConfig, cached_ramdisk, have_qemu

log = logging.getLogger(__name__)

# Seconds, from QEMU's start. Generous: TCG on a shared machine varies by 3x.
BOOT_TIMEOUT = 180
STEP_TIMEOUT = 120
STAMP = r"^\[\s*(\d+\.\d+)\] "


@pytest.fixture(scope="module")
def ramdisk() -> Ramdisk:
    if not have_qemu():
        pytest.skip("qemu-system-x86_64 is not installed (run `make deps`)")
    return cached_ramdisk()


@pytest.fixture
def blank_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.raw"
    run(["qemu-img", "create", "-f", "raw", disk, "4G"])
    return disk


def _boot(ramdisk: Ramdisk, disk: Path, workdir: Path, args: str) -> Qemu:
    cfg = QemuConfig(
        kernel=ramdisk.vmlinuz,
        initrd=ramdisk.initramfs,
        append=f"console=ttyS0 {args}",
        disks=(disk,),
    )
    return Qemu(cfg, workdir / "vm")


def test_initramfs_is_within_size_target(ramdisk: Ramdisk) -> None:
    assert ramdisk.initramfs.stat().st_size <= SIZE_LIMIT
    assert ramdisk.vmlinuz.stat().st_size > 1_000_000


def test_boots_to_agent(ramdisk: Ramdisk, blank_disk: Path, tmp_path: Path) -> None:
    with _boot(ramdisk, blank_disk, tmp_path, "bootenv.debug=1") as vm:
        vm.wait_for(r"Run /init as init process", BOOT_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: init started \(kernel \S+, debug=1\)", STEP_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: udev started", STEP_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: block devices: .*\bvda\b", STEP_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: dhcp bound: \S+ 10\.0\.2\.15/24 router 10\.0\.2\.2", STEP_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: network up on \S+: 10\.0\.2\.15/24 via 10\.0\.2\.2", STEP_TIMEOUT)
        vm.wait_for(STAMP + r"bootenv: python self-check OK: parted pyudev zstandard requests", STEP_TIMEOUT)
        # The ramdisk's self-check ran `bootenv agent --help` first: a ramdisk without a
        # usable agent says AGENT MISSING instead, and that is a failure here.
        m = vm.wait_for(
            STAMP + r"bootenv: (starting agent: python3 -m bootenv --debug agent|AGENT MISSING.*)$",
            STEP_TIMEOUT,
        )
        assert not m.group(2).startswith("AGENT MISSING"), m.group(0)
        at_agent = float(m.group(1))
        log.info("ramdisk reached the agent %.1f s after the kernel started", at_agent)
        # Without bootenv.image= the agent cannot provision; it ran and said something on
        # the console, time-stamped by the init.
        vm.wait_for(STAMP + r"(?!bootenv: starting agent).+$", STEP_TIMEOUT)
        console = vm.console
        assert "Kernel panic" not in console
        assert "Attempted to kill init" not in console
        assert vm.alive(), "the VM rebooted or powered off (QEMU runs with -no-reboot)"
    assert len(re.findall(r"Run /init as init process", console)) == 1, "the VM booted twice"


def test_shell_before_agent_then_rescue_shell(ramdisk: Ramdisk, blank_disk: Path, tmp_path: Path) -> None:
    with _boot(ramdisk, blank_disk, tmp_path, "bootenv.shell=1 bootenv.image=http://10.0.2.2:9/none") as vm:
        vm.wait_for(r"bootenv\.shell=1: shell before the agent", BOOT_TIMEOUT + STEP_TIMEOUT)
        vm.wait_for(r"# ", STEP_TIMEOUT)
        # The shell is on the console and sees the disk and the network.
        vm.send("ls /dev/vda && ip -4 -o addr | grep -c 10.0.2.15 && echo SHELL-$((40+2))\n")
        vm.wait_for(r"^/dev/vda\s*$", STEP_TIMEOUT)
        vm.wait_for(r"^SHELL-42", STEP_TIMEOUT)
        # Leaving it starts the agent; nothing listens on port 9, so the agent fails and
        # init drops to a rescue shell instead of rebooting.
        vm.send("exit\n")
        vm.wait_for(r"bootenv: starting agent", STEP_TIMEOUT)
        vm.wait_for(r"bootenv: dropping to a shell", 300)
        vm.wait_for(r"# ", STEP_TIMEOUT)
        # The agent's hand-off needs `reboot -f` (a busybox link the init makes).
        vm.send("command -v reboot && echo RESCUE-$((6*7)) && grep -c 'init started' /run/bootenv.log\n")
        vm.wait_for(r"^/usr/sbin/reboot\nRESCUE-42\n1$", STEP_TIMEOUT)
        assert vm.alive(), "the VM rebooted or powered off (QEMU runs with -no-reboot)"
