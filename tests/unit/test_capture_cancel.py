"""Capture packs the components on a thread while it builds the OS image: a failure on
either side stops the other at once (its tar killed, or at its next step), and is the
error reported. No process is started: tar is a pipe that nobody writes."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

import bootenv.capture as capture_mod
from bootenv import capture_pack
from bootenv.assign import plan_split
from bootenv.cancel import Cancel
from bootenv.dpkg import read_database
from bootenv.errors import FatalError
from bootenv.exclude import Exclusions
from bootenv.run import Stream
from bootenv.split import ComponentSpec
from bootenv.walk import scan
from tests.unit.fakeroot import make_tree

SPECS = (
    ComponentSpec("web", ("httpd",)),
    ComponentSpec("db", ("dbserver",)),
    ComponentSpec("php", ("modphp",)),
)


class _SilentTar:
    """A tar process that never writes: killing it (or, at the latest, a timer that
    keeps a wrong capture from hanging the test) ends its stream."""

    def __init__(self) -> None:
        r, self._w = os.pipe()
        self.stdout = os.fdopen(r, "rb")
        self.returncode: int | None = None
        self.killed_by = ""
        self._timer = threading.Timer(10, self._end, ("the test's timer",))
        self._timer.start()

    def _end(self, by: str) -> None:
        if self.returncode is None:
            self.returncode, self.killed_by = -9, by
            os.close(self._w)

    def kill(self) -> None:
        self._timer.cancel()
        self._end("the capture")

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        self._timer.join()
        assert self.returncode is not None
        return self.returncode


def _args(tmp_path: Path) -> tuple[Any, ...]:
    gold = make_tree(tmp_path / "gold")
    db = read_database(gold)
    entries = scan(gold)
    split = plan_split(db, SPECS, entries, Exclusions())
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    cfg = capture_mod.CaptureConfig(root=gold, output=tmp_path / "image", components=SPECS)
    return cfg, gold, db, split, entries, out, work


def test_a_failure_building_the_os_image_kills_the_component_being_packed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(tmp_path)
    tars: list[tuple[str, _SilentTar]] = []
    packing = threading.Event()

    def tar_create(root: Path, listing: Path, **_: object) -> Stream:
        tars.append((listing.name, _SilentTar()))
        packing.set()
        return Stream(["tar"], tars[-1][1], tempfile.TemporaryFile())  # type: ignore[arg-type]

    def pack_os(*_: object, **__: object) -> object:
        assert packing.wait(10)
        raise FatalError("mke2fs: No space left on device")

    monkeypatch.setattr(capture_pack, "tar_create", tar_create)
    monkeypatch.setattr(capture_mod, "pack_os", pack_os)
    with pytest.raises(FatalError, match=r"^mke2fs: No space left on device$"):
        capture_mod._pack_all(*args)
    # Every tar started (one per packer at most, the largest component first) is killed;
    # no component is started once the capture has failed.
    assert tars and {name for name, _ in tars} <= {"db.list", "web.list"}  # the largest; not php
    assert all(tar.killed_by == "the capture" for _, tar in tars), tars


def test_a_failed_component_stops_the_os_image_before_its_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(tmp_path)
    staging, failed = threading.Event(), threading.Event()
    steps: list[str] = []

    class Recorded(Cancel):
        def set(self, cause: BaseException) -> None:
            super().set(cause)
            failed.set()

    def tar_create(*_: object, **__: object) -> Stream:
        assert staging.wait(10)
        raise FatalError("tar exited with 2: ./srv: Cannot open: Input/output error")

    real_stage = capture_pack.stage

    def stage(*a: Any) -> Any:  # the component fails while the OS tree is staged
        staging.set()
        assert failed.wait(10)
        steps.append("staged")
        return real_stage(*a)

    def make_ext4(*_: object) -> None:
        steps.append("mke2fs")

    monkeypatch.setattr(capture_mod, "Cancel", Recorded)
    monkeypatch.setattr(capture_pack, "tar_create", tar_create)
    monkeypatch.setattr(capture_pack, "stage", stage)
    monkeypatch.setattr(capture_pack, "make_ext4", make_ext4)
    with pytest.raises(FatalError, match=r"^tar exited with 2: ./srv: Cannot open"):
        capture_mod._pack_all(*args)
    assert steps == ["staged"]
