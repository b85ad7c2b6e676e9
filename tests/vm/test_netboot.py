"""Netboot through real iPXE (-boot n) and provision end to end, under SeaBIOS and OVMF.

One lab (signed LAMP image, ramdisk, `bootenv serve` on 127.0.0.1) serves two VMs:
- an assigned MAC gets its per-machine script, provisions with no key press, kexecs into
  the target, which reaches multi-user.target and answers on MariaDB's port; the same disk
  then boots again with no kernel arguments under SeaBIOS and under OVMF;
- an unknown MAC gets the menu, whose default entry is chosen by the timeout, under OVMF
  to the end, and under SeaBIOS until the agent reports in;
- an assigned MAC gets its own script under OVMF too, until the agent reports in.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from bootenv.hold import hold, release
from bootenv.lab import MENU_DEFAULT, Lab, follow, lab, new_disk, vm_spec
from bootenv.machines import Machine, State, assign
from bootenv.qemu import Vm, free_port
from tests.conftest import require_root, require_tools

TIMEOUT = 1500.0  # TCG on a busy 2-core machine: PXE, 700 MiB of OS, kexec, layout


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    require_tools("qemu-system-x86_64", "debootstrap")
    roms = (Path("/usr/lib/ipxe/qemu/efi-virtio.rom"), Path("/usr/share/qemu/efi-virtio.rom"))
    if not any(p.exists() for p in roms):
        pytest.skip("QEMU's iPXE ROMs are missing (ipxe-qemu)")
    with lab(tmp_path_factory.mktemp("lab")) as it:
        yield it


def _greets(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(256)


def _wait_greeting(port: int, timeout: float = 120) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = _greets(port)
            if data:
                return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            return b""
        time.sleep(2)


@dataclass(frozen=True)
class Provisioned:
    """A machine netbooted and provisioned once, for every test that looks at it or its disk."""

    disk: Path
    machine: Machine
    console: str  # up to multi-user.target, for a machine that got there
    greeting: bytes  # what MariaDB's port said first (b"" if nothing answered)
    laid: frozenset[str]  # the components the layout reported done


def _provision(the_lab: Lab, name: str, mac: str, firmware: Literal["bios", "uefi"]) -> Provisioned:
    disk = new_disk(the_lab.work / f"{name}.img")
    sql = free_port()
    with Vm(vm_spec(the_lab, name, disk, mac=mac, firmware=firmware, hostfwd=((sql, 3306),))) as vm:
        machine = follow(the_lab.store, mac, vm, timeout=TIMEOUT)
        greeting = b""
        if machine.state is State.DONE:
            vm.wait_for(r"Reached target .*Multi-User System", timeout=120)
            greeting = _wait_greeting(sql)
        console = vm.console()
    laid = frozenset(
        str(e.get("component"))
        for e in the_lab.store.events(mac)
        if e.get("step") == "component" and e.get("status") == "done"
    )
    return Provisioned(disk, machine, console, greeting, laid)


@pytest.fixture(scope="module")
def db1(the_lab: Lab) -> Provisioned:
    """An assigned MAC, under SeaBIOS: its own script, OS + MySQL, no key pressed."""
    mac = "52:54:00:00:00:a1"
    the_lab.store.put(
        assign(mac, "lamp", "mysql", now=time.time(), hostname="db1", kernel_args=the_lab.trust_args())
    )
    return _provision(the_lab, "a1", mac, "bios")


@pytest.fixture(scope="module")
def from_menu(the_lab: Lab) -> Provisioned:
    """An unknown MAC, under OVMF: the menu, whose default entry the timeout chooses."""
    mac = "52:54:00:00:00:b2"
    assert the_lab.store.get(mac) is None
    return _provision(the_lab, "b2", mac, "uefi")


def test_assigned_machine_provisions_then_boots_from_disk(the_lab: Lab, db1: Provisioned) -> None:
    assert db1.machine.state is State.DONE, db1.machine.error
    # The agent wrote the disk, then kexec'd the target's own kernel, which booted.
    assert re.search(r"wrote [\d.]+ MiB of a [\d.]+ MiB image to /dev/vda", db1.console)
    assert b"MariaDB" in db1.greeting
    # Only MySQL was asked for: the database lists it and nothing of Apache or PHP.
    assert db1.laid == {"mysql"}
    assert db1.machine.reached(State.OS_WRITTEN) and db1.machine.reached(State.OS_BOOTED)
    # The same disk boots on its own, with no network and no kernel arguments. Booted
    # under BIOS, it starts MariaDB, which answers some seconds after the login prompt.
    # Before the UEFI boot, MySQL's unit is held back as a layout cut short leaves it
    # (bootenv/hold.py): systemd must not start it, though its enablement link is there,
    # so it must stay silent for twice as long as it took to answer (at least a minute).
    answered_after = 0.0
    for firmware in ("bios", "uefi"):
        held = firmware == "uefi"
        if held:
            with _root_mounted(db1.disk, writable=True) as mnt:
                # The first boot's layout is over: if the VM was stopped before its unit's
                # cleanup reached the disk, that layout would run again, find MySQL laid
                # out, and rightly let it start. Done here as the cleanup does it.
                handoff = mnt / "etc/bootenv/layout.json"
                if handoff.exists():
                    handoff.rename(handoff.with_name("layout.json.done"))
                (mnt / "etc/systemd/system/multi-user.target.wants/bootenv-layout.service").unlink(
                    missing_ok=True
                )
                hold(mnt, {"mysql": ("mariadb.service", "mariadb.socket")})
        sql = free_port()
        spec = vm_spec(
            the_lab,
            f"a1-{firmware}",
            db1.disk,
            mac=db1.machine.mac,
            firmware=firmware,
            netboot=False,
            hostfwd=((sql, 3306),),
        )
        try:
            with Vm(spec) as vm:
                vm.wait_for(r"db1 login:", timeout=600)
                prompt = time.monotonic()
                greeting = _wait_greeting(sql, timeout=max(60.0, 2 * answered_after) if held else 180)
                answered_after = time.monotonic() - prompt
        finally:
            if held:
                with _root_mounted(db1.disk, writable=True) as mnt:
                    release(mnt, "mysql", ("mariadb.service", "mariadb.socket"))
        assert (b"MariaDB" in greeting) is not held, (firmware, greeting)


def test_unknown_machine_gets_the_menu_and_its_default_under_uefi(from_menu: Provisioned) -> None:
    assert from_menu.machine.state is State.DONE, from_menu.machine.error
    assert from_menu.machine.entry == MENU_DEFAULT  # chosen by the menu's timeout, no key pressed
    assert from_menu.machine.components == "mysql"
    assert from_menu.laid == {"mysql"} and b"MariaDB" in from_menu.greeting


def test_unknown_machine_gets_the_menu_under_bios_and_boots_the_agent(the_lab: Lab) -> None:
    # The menu under SeaBIOS, up to the agent's first report: what follows is the same
    # per-machine path the assigned machine above takes under SeaBIOS.
    mac = "52:54:00:00:00:c3"
    disk = new_disk(the_lab.work / "c3.img")
    with Vm(vm_spec(the_lab, "c3", disk, mac=mac, firmware="bios")) as vm:
        machine = follow(the_lab.store, mac, vm, timeout=TIMEOUT, until=State.PROVISIONING)
        assert machine.state is not State.FAILED and machine.reached(State.PROVISIONING), machine.error
        assert machine.entry == MENU_DEFAULT  # chosen by the menu's timeout, no key pressed
        assert machine.components == "mysql"
    disk.unlink()


def test_assigned_machine_gets_its_own_script_under_uefi_and_boots_the_agent(the_lab: Lab) -> None:
    # The per-machine script under OVMF, up to the agent's first report: the assigned
    # machine above goes the whole way under SeaBIOS, the menu's machine under OVMF.
    mac = "52:54:00:00:00:d4"
    the_lab.store.put(assign(mac, "lamp", "php", now=time.time(), kernel_args=the_lab.trust_args()))
    disk = new_disk(the_lab.work / "d4.img")
    with Vm(vm_spec(the_lab, "d4", disk, mac=mac, firmware="uefi")) as vm:
        machine = follow(the_lab.store, mac, vm, timeout=TIMEOUT, until=State.PROVISIONING)
        assert machine.state is not State.FAILED and machine.reached(State.PROVISIONING), machine.error
        assert machine.entry is None and machine.components == "php"  # no menu was shown
    disk.unlink()


def _root_partition_files(disk: Path, paths: tuple[str, ...]) -> dict[str, bytes]:
    """Read files from a provisioned disk's root partition."""
    with _root_mounted(disk) as mnt:
        return {p: (mnt / p.lstrip("/")).read_bytes() for p in paths}


@contextmanager
def _root_mounted(disk: Path, *, writable: bool = False) -> Iterator[Path]:
    """A provisioned disk's root partition (the last one), mounted read-only (or not)."""
    import json

    from bootenv.run import run

    table = json.loads(run(["sfdisk", "--json", disk]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    last = table["partitions"][-1]
    offset, size = int(last["start"]) * sector, int(last["size"]) * sector
    # Writable, so that the read-only mount replays the journal: the VM was killed with
    # the filesystem mounted, and what its first boot wrote last (the SSH host keys) may
    # be in the journal only. Reading past it (`noload`) missed them whenever the VM was
    # stopped within the half minute before ext4 wrote them home.
    loop = run(["losetup", "--find", "--show", f"--offset={offset}", f"--sizelimit={size}", disk])
    dev = loop.stdout.decode().strip()
    mnt = disk.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    try:
        run(["mount", "-o", "rw" if writable else "ro", dev, mnt])
        try:
            yield mnt
        finally:
            run(["umount", mnt])
    finally:
        run(["losetup", "-d", dev])


def test_a_component_laid_out_leaves_its_units_held_no_more(db1: Provisioned) -> None:
    """Its units were held back (a drop-in and a flag) while it was laid out; MariaDB
    answering shows the hold let go before activation, and nothing of it stays."""
    assert db1.machine.state is State.DONE, db1.machine.error
    with _root_mounted(db1.disk) as mnt:
        assert (mnt / "var/lib/bootenv/layout/held").is_dir()  # it was made ...
        assert list((mnt / "var/lib/bootenv/layout/held").iterdir()) == []  # ... and emptied
        assert list((mnt / "etc/systemd/system").glob("*.d/bootenv-hold-*")) == []


def test_two_machines_from_one_image_have_their_own_identity(
    db1: Provisioned, from_menu: Provisioned
) -> None:
    for it in (db1, from_menu):
        assert it.machine.state is State.DONE, it.machine.error
    paths = ("/etc/machine-id", "/etc/hostname", "/etc/ssh/ssh_host_ed25519_key.pub")
    a, b = (_root_partition_files(it.disk, paths) for it in (db1, from_menu))
    for path in paths:
        assert a[path].strip() and b[path].strip(), path  # each was made on first boot
        assert a[path] != b[path], path
    assert a["/etc/hostname"].strip() == b"db1"
