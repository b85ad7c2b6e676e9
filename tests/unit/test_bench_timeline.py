"""Benchmark 7's summary: milestones and phases of both images, ratios split/single."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.timeline import Run, summarize


def run(kind: str, agent: float, written: float, booted: float, done: float, ready: float) -> Run:
    """The disk is bootable 8 s after the OS is written."""
    at = {"agent": agent, "written": written, "bootable": written + 8, "os_booted": booted}
    return Run(kind, {**at, "done": done, "ready": ready})


def test_summary_reports_both_kinds_and_the_ratios() -> None:
    r = summarize(
        [
            run("split", 40, 90, 200, 260, 262),
            run("single", 40, 110, 250, 252, 254),
            run("split", 50, 100, 210, 270, 272),
            run("single", 44, 120, 240, 244, 246),
        ]
    )
    assert r.measurements["split: OS booted (s)"].median == 205
    assert r.measurements["single: OS booted (s)"].median == 245
    assert r.measurements["split: phase write (s)"].median == 50
    assert r.measurements["split: disk bootable (s)"].median == 103
    assert r.measurements["split: phase filesystems + configure + runtime + grub (s)"].median == 8
    assert r.measurements["split: phase kexec + boot (s)"].median == 102
    assert r.measurements["single: phase first-boot layout (s)"].median == 3
    assert r.measurements["split: services answer (s)"].runs == 2
    assert r.ratio == pytest.approx(205 / 245) and r.passed is None  # reported, not judged
    assert "OS written: split 95.0 s, single 115.0 s = 0.83x" in r.notes
    assert any(n.startswith("services answer: split 267.0 s, single 250.0 s") for n in r.notes)
    assert "phase first-boot layout: split 60.0 s, single 3.0 s = 20.00x" in r.notes


def test_no_ratio_over_a_near_zero_single_phase() -> None:
    r = summarize([run("split", 40, 90, 200, 300, 301), run("single", 40, 110, 250, 250.1, 251)])
    assert "phase first-boot layout: split 100.0 s, single 0.1 s = no ratio" in r.notes


def test_a_split_image_that_boots_later_is_reported_as_such() -> None:
    r = summarize([run("split", 40, 90, 300, 360, 361), run("single", 40, 110, 250, 252, 254)])
    assert r.ratio == pytest.approx(1.2) and r.target == "reported"


def test_a_subset_is_reported_against_the_single_image_too() -> None:
    r = summarize(
        [
            run("split", 40, 90, 200, 260, 262),
            run("subset", 40, 80, 190, 220, 222),
            run("single", 40, 110, 250, 252, 254),
        ]
    )
    assert r.measurements["subset: OS written (s)"].median == 80
    assert r.measurements["subset: phase first-boot layout (s)"].median == 30
    assert "OS written: split 90.0 s, single 110.0 s = 0.82x; OS + mysql 80.0 s = 0.73x" in r.notes
    assert "services answer: split 262.0 s, single 254.0 s = 1.03x; OS + mysql 222.0 s = 0.87x" in r.notes
    assert "OS + mysql" in r.what and r.ratio == pytest.approx(200 / 250)


def test_uefi_boots_are_a_row_of_their_own() -> None:
    runs = [run("split", 40, 90, 200, 260, 262), run("single", 40, 110, 250, 252, 254)]
    bios, uefi = summarize(runs), summarize(runs, "uefi")
    assert (bios.name, uefi.name) == ("qemu-timeline", "qemu-timeline (uefi)")
    assert "SeaBIOS" in bios.what and "OVMF" in uefi.what
    assert uefi.ratio == bios.ratio == pytest.approx(200 / 250)


def test_the_lab_timeline_has_the_os_written_and_the_disk_bootable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of write-os moves no state (the disk cannot boot yet): the timeline takes
    "OS written" from its event, "disk bootable" from serve's os_written."""
    from bootenv import state
    from bootenv.event_schema import parse_event
    from bootenv.lab import Timeline, timeline
    from bootenv.machines import assign
    from bootenv.serve import _unknown_machine

    mac, clock = "52:54:00:12:34:56", [1000.0]
    monkeypatch.setattr(state.time, "time", lambda: clock[0])
    store = state.Store(tmp_path)
    store.put(assign(mac, "lamp", "mysql", now=1000.0))
    machine = store.get(mac)
    assert machine is not None
    for at, doc in [
        (10, {"event": "start"}),
        (20, {"event": "step", "step": "write-os", "status": "done"}),
        (30, {"event": "step", "step": "bootloader", "status": "done"}),
        (31, {"event": "os_written"}),
        (32, {"event": "step", "step": "handoff", "status": "start"}),
        (60, {"event": "os_booted", "source": "layout"}),
        (
            70,
            {
                "event": "step",
                "source": "layout",
                "step": "component",
                "status": "done",
                "component": "mysql",
            },
        ),
        (80, {"event": "done", "source": "layout"}),
    ]:
        clock[0] = 1000.0 + at
        store.update(mac, parse_event(doc), doc, create=_unknown_machine, assignment=machine.assignment)
    machine = store.get(mac)
    assert machine is not None
    assert timeline(store, machine, 1000.0) == Timeline(10, 20, 31, 60, (("mysql", 70),), 80)
