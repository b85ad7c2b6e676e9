"""`bootenv agent` against a real `bootenv serve`: the machine is taken as provisioned
(its network boots answered with its local disk) only once its disk can boot.

Serve marked the end of the agent's write-os step os_written, and answered every later
network boot with sanboot. The disk could not boot then: the agent grows the root
filesystem, makes the ESP, configures the target and installs grub after it. A power
cut or a reset in between left a machine that booted nothing, was never provisioned
again and showed no error.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bootenv import agent, agent_disk, bootloader, runtime, target
from bootenv.callback import Callback
from bootenv.cmdline import parse_cmdline
from bootenv.disks import DiskChoice, DiskInfo
from bootenv.machines import Machine, State, assign
from bootenv.partition import MiB, PartitionPlan, Role, plan_partitions
from bootenv.serve import BootenvServer, ServeConfig, running
from tests.unit.test_oswrite import build_image

MAC = "52:54:00:00:00:72"
DISK_SIZE = 1024 * MiB  # sparse: room for the test image and what the agent adds


class PowerCut(BaseException):
    """The machine loses power: nothing of the agent runs after it (no wipe), and
    nothing more is posted (the events queued before still reach serve, as they may
    well have)."""


class Power:
    def __init__(self) -> None:
        self.on = True

    def cut(self, *args: object) -> None:
        self.on = False
        raise PowerCut


@contextmanager
def serve(tmp_path: Path) -> Iterator[tuple[BootenvServer, Machine]]:
    """`bootenv serve` with the test image (images/image) and a ramdisk, and MAC
    assigned to it."""
    (tmp_path / "images").mkdir()
    build_image(tmp_path / "images")  # images/image: a 24 MiB OS sub-image
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"K" * 1000)
    (boot / "initramfs.img").write_bytes(b"I" * 3000)
    config = ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0, boot=boot)
    with running(config) as srv:
        srv.store.put(assign(MAC, "image", "none", now=time.time()))
        machine = srv.store.get(MAC)
        assert machine is not None
        yield srv, machine


def next_boot(srv: BootenvServer) -> str:
    """The iPXE script the machine's next network boot gets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/ipxe/machine?mac={MAC}") as answer:
        return str(answer.read().decode())


def old_install(path: Path) -> PartitionPlan:
    """A sparse disk holding an earlier install's bytes where the agent partitions."""
    plan = plan_partitions(DISK_SIZE, 512, 24 * MiB)
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        for p in plan.partitions:
            os.pwrite(f.fileno(), b"old loader".ljust(MiB, b"\1"), p.offset)
    return plan


def run_agent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, srv: BootenvServer, machine: Machine, power: Power
) -> list[str]:
    """Run the agent on a disk image file (its table written by pyparted, the OS by
    write_os, both for real; the partitions are files of their own) up to where the test's
    stand-ins stop it (`power`). What ran and was posted, in order ("post EVENT ..." as an
    event is queued)."""
    disk = tmp_path / "disk.img"
    old_install(disk)
    did: list[str] = []
    monkeypatch.setattr(
        agent_disk, "choose", lambda cfg, size, needs="": DiskChoice(DiskInfo(str(disk), DISK_SIZE), ())
    )
    monkeypatch.setattr(bootloader, "check_available", lambda: None)
    monkeypatch.setattr(agent_disk, "wipe_disk", lambda d, plan: did.append("wipe"))
    monkeypatch.setattr(agent, "run", lambda argv, **kw: did.append(Path(str(argv[0])).name))
    monkeypatch.setattr(agent, "which", lambda tool: tool)
    parts = {Role.ROOT: str(tmp_path / "root.img"), Role.ESP: str(tmp_path / "esp.img")}
    monkeypatch.setattr(agent_disk, "partition_devices", lambda d, plan, stack: parts)
    send = Callback.send

    def queued(self: Callback, body: dict[str, Any]) -> None:
        if power.on:
            fields = [str(body[k]) for k in ("step", "status") if k in body]
            did.append(" ".join(["post", str(body["event"]), *fields]))
            send(self, body)

    monkeypatch.setattr(Callback, "send", queued)
    base = f"http://127.0.0.1:{srv.port}"
    text = (
        f"bootenv.image={base}/images/image bootenv.insecure bootenv.components=none "
        f"bootenv.callback={base}/callback/{MAC}/{machine.assignment} bootenv.handoff=none"
    )
    try:
        agent.run_agent(parse_cmdline(text), ramdisk_cmdline=text)
    finally:
        did.append("end")
    return did


def test_a_power_cut_before_the_disk_boots_is_provisioned_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The reviewer's cut_after_write.py: the power goes once the OS is written, as the
    filesystems step starts. The machine's next network boot provisions it again."""
    power = Power()
    monkeypatch.setattr(target, "prepare_root_fs", power.cut)
    with serve(tmp_path) as (srv, machine):
        with pytest.raises(PowerCut):
            run_agent(monkeypatch, tmp_path, srv, machine, power)
        after = srv.store.get(MAC)
        script = next_boot(srv)
    assert after is not None and (after.state, after.error) == (State.PROVISIONING, None)
    assert after.reached(State.OS_WRITTEN) is None
    assert f"bootenv.callback=http://127.0.0.1:{srv.port}/callback/{MAC}/" in script
    assert "kernel " in script and "sanboot" not in script


def test_a_cut_right_after_partitioning_leaves_no_old_loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The new table names the BIOS boot partition and the ESP where an earlier install
    had its loaders: they are zeroed before it is written, so that firmware finds
    neither grub's old core.img nor an old ESP (whose grub.cfg names the old root)."""
    apply_plan, power = agent.apply_plan, Power()

    def then_cut(disk: str, plan: PartitionPlan) -> None:
        apply_plan(disk, plan)
        power.cut()

    monkeypatch.setattr(agent, "apply_plan", then_cut)
    with serve(tmp_path) as (srv, machine), pytest.raises(PowerCut):
        run_agent(monkeypatch, tmp_path, srv, machine, power)
    plan = plan_partitions(DISK_SIZE, 512, 24 * MiB)
    with open(tmp_path / "disk.img", "rb") as f:
        assert os.pread(f.fileno(), 8, 512) == b"EFI PART"  # the new table is written
        assert os.pread(f.fileno(), MiB, plan.bios.offset) == bytes(MiB)
        assert os.pread(f.fileno(), MiB, plan.esp.offset) == bytes(MiB)


def test_the_agent_says_os_written_once_its_disk_boots(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After the boot loaders and the sync, before the hand-off: serve then answers the
    machine's network boots with its disk."""

    @contextmanager
    def mounted(device: str) -> Iterator[Path]:
        (tmp_path / "target").mkdir()
        yield tmp_path / "target"

    with serve(tmp_path) as (srv, machine):
        stand_ins = {
            (target, "prepare_root_fs"): "grow",
            (target, "make_esp"): "esp",
            (target, "configure"): "configure",
            (runtime, "install_runtime"): "runtime",
            (agent, "_install_bootloader"): "grub",
        }
        did: list[str] = []
        for (module, name), what in stand_ins.items():
            monkeypatch.setattr(module, name, lambda *a, what=what: did.append(what))
        monkeypatch.setattr(target, "mounted", mounted)
        ran = run_agent(monkeypatch, tmp_path, srv, machine, Power())
        after = srv.store.get(MAC)
        script = next_boot(srv)
    assert did == ["grow", "esp", "configure", "runtime", "grub"]
    tail = ran[ran.index("post step bootloader done") :]
    assert tail == ["post step bootloader done", "sync", "post os_written", "post step handoff start", "end"]
    assert after is not None and after.state is State.OS_WRITTEN
    assert "sanboot" in script and "kernel " not in script
