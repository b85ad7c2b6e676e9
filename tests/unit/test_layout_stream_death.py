"""A stream process killed mid-layout (the OOM killer): one clear failure, then a re-run resumes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bootenv import layout as layout_mod
from bootenv import stream
from bootenv.callback import Event
from bootenv.cli import main
from bootenv.errors import RetryableError
from bootenv.journal import STATE_DIR
from bootenv.layout import STREAM_DIED, LayoutConfig, layout
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image

_LAY_OUT_PIECE = stream.lay_out_piece


def _killed_on_b(comp: Any, index: int, root: Path, *args: Any) -> Any:
    """A stream's job that is killed on component b, once a is in (so what a kill of
    that one stream leaves is certain: a done, b not)."""
    if comp.name == "b":
        deadline = time.monotonic() + 30
        while not (root / STATE_DIR / "a.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return _LAY_OUT_PIECE(comp, index, root, *args)


def _image(tmp_path: Path) -> Path:
    return make_image(
        tmp_path / "img",
        [
            Comp("a", [d("opt"), f("opt/a", "x")], units=("a.service",)),
            Comp("b", [d("srv"), f("srv/b", "y")], units=("b.service",)),
        ],
    )


def test_a_killed_stream_fails_its_component_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, root = _image(tmp_path), tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(stream, "lay_out_piece", _killed_on_b)
    act, events = ActivatedUnits(), list[Event]()
    res = layout(LayoutConfig(str(image), "all", root, streams=2), activator=act, emit=events.append)
    a, b = res.components
    assert (a.name, a.status) == ("a", "done")
    assert (b.name, b.status, b.error, b.code) == ("b", "failed", STREAM_DIED, RetryableError.exit_code)
    assert act.units == ["a.service"]  # the other component is activated
    assert (root / "opt/a").read_text() == "x"
    failure = res.failure()
    assert failure is not None and str(failure) == f"layout failed: b: {STREAM_DIED}"
    ends = [e for e in events if e.get("step") == "component" and e.get("status") == "failed"]
    assert [(e["component"], e["message"]) for e in ends] == [("b", STREAM_DIED)]
    assert events[-1]["event"] == "error" and events[-1]["message"] == "layout failed: b"

    monkeypatch.setattr(stream, "lay_out_piece", _LAY_OUT_PIECE)
    again = layout(LayoutConfig(str(image), "all", root, streams=2), activator=act)
    assert again.ok and [c.status for c in again.components] == ["resumed", "done"]
    assert (root / "srv/b").read_text() == "y"


def test_the_cli_reports_a_killed_stream_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image, root = _image(tmp_path), tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(layout_mod, "activate", ActivatedUnits())
    monkeypatch.setattr(stream, "lay_out_piece", _killed_on_b)
    argv = ["layout", "--image", str(image), "--components", "all", "--root", str(root), "--streams", "2"]
    rc = main([*argv, "--insecure"])
    err = capsys.readouterr().err
    assert rc == RetryableError.exit_code
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"bootenv: error: layout failed: b: {STREAM_DIED}"
    monkeypatch.setattr(stream, "lay_out_piece", _LAY_OUT_PIECE)
    assert main([*argv, "--insecure"]) == 0
    assert (root / "srv/b").read_text() == "y"
