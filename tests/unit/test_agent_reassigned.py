"""`bootenv agent` against a real `bootenv serve`, whose machine the admin assigns again
while its run is provisioning.

Serve refused the run's events (409), and the agent only logged `HTTP 409` and went
on: it wrote the old image and handed off into it, and the new assignment waited for a
network boot nobody knew was needed. It stops now, at the next step or at the latest
before the hand-off, and wipes what it wrote.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from bootenv import agent, agent_disk, bootloader, cli, handoff
from bootenv.disks import DiskChoice, DiskInfo
from bootenv.machines import Machine, State, assign
from bootenv.partition import MiB, PartitionPlan, Role, plan_partitions, required_size
from bootenv.serve import BootenvServer, ServeConfig, running
from tests.unit.test_agent import need
from tests.unit.test_oswrite import SIZE, build_image

MAC = "52:54:00:00:00:71"


class Heard(logging.Handler):
    """Set once the agent's poster logs a refusal: serve's answer is known to the agent."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "HTTP 409" in record.getMessage():
            self.refused.set()


@contextmanager
def heard() -> Iterator[threading.Event]:
    # On the poster's own logger: cli.main sets the root logger's handlers afresh.
    handler, logger = Heard(), logging.getLogger("bootenv.callback")
    logger.addHandler(handler)
    try:
        yield handler.refused
    finally:
        logger.removeHandler(handler)


def disk_file(path: Path, size: int) -> PartitionPlan:
    """A sparse disk holding an old system's bytes where the agent writes and wipes; the
    plan the agent makes for it."""
    plan = plan_partitions(size, 512, SIZE)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, size - MiB, *(p.offset for p in plan.partitions)):
            os.pwrite(f.fileno(), os.urandom(MiB), offset)
    return plan


def wiped(path: Path, plan: PartitionPlan) -> bool:
    with open(path, "rb") as f:
        offsets = (0, plan.disk_size - MiB, *(p.offset for p in plan.partitions))
        return all(os.pread(f.fileno(), MiB, o) == bytes(MiB) for o in offsets)


def reassign(srv: BootenvServer) -> Machine:
    srv.store.put(assign(MAC, "image", "none", now=time.time()))
    machine = srv.store.get(MAC)
    assert machine is not None and machine.assignment
    return machine


def run_reassigned(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[[BootenvServer, threading.Event, Path], None],
    *,
    touched: bool = True,
) -> tuple[int, str, str, list[list[str]], Machine, Machine]:
    """Assign the machine, run `bootenv agent` on its callback URL (to a disk image file,
    which wipefs and parted write for real, handing off by reboot), once `fake` has put
    the test's stand-ins in (given serve, an event set once the agent has heard a 409,
    and the scratch directory): (exit code, the last line on stderr, stdout, what the
    hand-off ran, the assignment the run was of, the one after). `touched`: the run
    stopped once it had written to the disk, which is wiped then; else it is as it was."""
    (tmp_path / "images").mkdir()
    build_image(tmp_path / "images")  # images/image: the OS sub-image, 24 MiB
    disk = tmp_path / "disk.img"
    plan = disk_file(disk, required_size(need(SIZE)))
    before = disk.read_bytes()
    monkeypatch.setattr(
        agent_disk, "choose", lambda cfg, size, needs="": DiskChoice(DiskInfo(str(disk), plan.disk_size), ())
    )
    monkeypatch.setattr(bootloader, "check_available", lambda: None)
    ran: list[list[str]] = []
    monkeypatch.setattr(handoff, "run", lambda argv, **kw: ran.append([str(a) for a in argv]))
    monkeypatch.setattr(handoff, "which", lambda tool: tool)
    config = ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0)
    with running(config) as srv, heard() as refused:
        old = reassign(srv)
        base = f"http://127.0.0.1:{srv.port}"
        fake(srv, refused, tmp_path)
        (tmp_path / "cmdline").write_text(
            f"bootenv.image={base}/images/image bootenv.insecure bootenv.components=none "
            f"bootenv.callback={base}/callback/{MAC}/{old.assignment} bootenv.handoff=reboot\n"
        )
        code = cli.main(["agent", "--cmdline", str(tmp_path / "cmdline")])
        new = srv.store.get(MAC)
    assert new is not None and new.assignment != old.assignment
    out, err = capsys.readouterr()
    if touched:
        assert wiped(disk, plan), "the disk can still boot what the run wrote"
    else:
        assert disk.read_bytes() == before, "a run that wrote nothing wiped the disk"
    return code, err.splitlines()[-1], out, ran, old, new


def said(old: Machine, before: str) -> str:
    """The pattern of the agent's last line, stopped before `before` (a pattern)."""
    reason = f"{MAC} was assigned again since assignment {old.assignment}: its run's events are not taken"
    start = (
        f"bootenv: error: this machine was assigned again since this run started (bootenv serve: {reason})"
    )
    hint = "(hint: reboot it by network boot to provision it with its new assignment)"
    return f"{re.escape(start)}: stopped before {before} {re.escape(hint)}"


def test_a_run_assigned_again_while_it_writes_stops_at_its_next_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], allow_run: None
) -> None:
    """Assigned again once the disk is partitioned: the run's next events are refused,
    and the step after the answer comes (write-os, or filesystems once the OS is
    written) does not start; the disk is wiped, and nothing is handed off."""

    def fake(srv: BootenvServer, refused: threading.Event, tmp: Path) -> None:
        def partitions(disk: str, plan: PartitionPlan, stack: ExitStack) -> dict[Role, str]:
            reassign(srv)  # wipefs and the new partition table have touched the disk
            return {Role.ROOT: str(tmp / "root.img"), Role.ESP: str(tmp / "esp.img")}

        write_os = agent.write_os

        def write_after_the_answer(*args: object, **kw: object) -> object:
            assert refused.wait(10), "serve's 409 never reached the agent"
            return write_os(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(agent_disk, "partition_devices", partitions)
        monkeypatch.setattr(agent, "write_os", write_after_the_answer)

    code, last, out, ran, old, new = run_reassigned(monkeypatch, tmp_path, capsys, fake)
    assert code == 1 and ran == [] and "provisioned" not in out
    assert re.fullmatch(said(old, "the (write-os|filesystems) step"), last), last
    # The run's events after the new assignment touched nothing of it.
    assert (new.state, new.events) == (State.ASSIGNED, 0)


def test_a_run_assigned_again_after_its_last_step_does_not_hand_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], allow_run: None
) -> None:
    """Assigned again once the disk is written: no step is left, and the refusal of the
    hand-off's start is the last chance not to boot the old image."""

    def fake(srv: BootenvServer, refused: threading.Event, tmp: Path) -> None:
        def write_disk(cfg: object, disk: str, *rest: object) -> None:
            with open(disk, "r+b") as f:
                f.write(b"the old assignment's system".ljust(MiB, b"\1"))
            reassign(srv)

        monkeypatch.setattr(agent, "_write_disk", write_disk)

    code, last, out, ran, old, new = run_reassigned(monkeypatch, tmp_path, capsys, fake)
    assert code == 1 and ran == [] and "provisioned" not in out
    assert re.fullmatch(said(old, "the hand-off"), last), last
    assert (new.state, new.events) == (State.ASSIGNED, 0)


def test_a_run_assigned_again_before_it_writes_leaves_the_disk_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], allow_run: None
) -> None:
    """Assigned again while the agent checks the disk: it stops before the partition
    step, and the disk (an old system, maybe a good one) is not wiped: the check inside
    the partition step wiped a disk nothing had been written to."""
    commands: list[list[str]] = []

    def fake(srv: BootenvServer, refused: threading.Event, tmp: Path) -> None:
        preflight, passed_on = agent_disk.preflight, agent.check_passed_on

        def reassigned_meanwhile(disk: str, min_root: int, what: str = "") -> PartitionPlan:
            reassign(srv)
            return preflight(disk, min_root, what)

        def after_the_answer(cmdline: str) -> None:
            assert refused.wait(10), "serve's 409 never reached the agent"
            passed_on(cmdline)

        monkeypatch.setattr(agent_disk, "preflight", reassigned_meanwhile)
        monkeypatch.setattr(agent, "check_passed_on", after_the_answer)
        monkeypatch.setattr(agent, "run", lambda argv, **kw: commands.append([str(a) for a in argv]))
        monkeypatch.setattr(agent_disk, "run", lambda argv, **kw: commands.append([str(a) for a in argv]))

    code, last, out, ran, old, new = run_reassigned(monkeypatch, tmp_path, capsys, fake, touched=False)
    assert code == 1 and ran == [] and commands == [] and "provisioned" not in out
    assert re.fullmatch(said(old, "the partition step"), last), last
    assert (new.state, new.events) == (State.ASSIGNED, 0)
