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
from bootenv.errors import RetryableError, VerificationError
from bootenv.event_schema import parse_event
from bootenv.journal import STATE_DIR
from bootenv.layout import LayoutConfig, LayoutResult, layout
from bootenv.machines import Machine, State, apply, assign
from bootenv.schedule import STREAM_DIED, ComponentResult
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


def _image(tmp_path: Path, *, a_depends_on_b: bool = False) -> tuple[Path, Path]:
    """An image of two components, a and b (whose stream is the one killed), and an
    empty root to lay them out in."""
    image = make_image(
        tmp_path / "img",
        [
            Comp(
                "a",
                [d("opt"), f("opt/a", "x")],
                depends=("b",) if a_depends_on_b else (),
                units=("a.service",),
            ),
            Comp("b", [d("srv"), f("srv/b", "y")], units=("b.service",)),
        ],
    )
    (tmp_path / "root").mkdir()
    return image, tmp_path / "root"


def test_a_killed_stream_fails_its_component_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, root = _image(tmp_path)
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
    assert (events[-1]["event"], events[-1]["message"], events[-1]["fatal"]) == (
        "error",
        f"layout failed: b: {STREAM_DIED}",
        True,
    )

    monkeypatch.setattr(stream, "lay_out_piece", _LAY_OUT_PIECE)
    again = layout(LayoutConfig(str(image), "all", root, streams=2), activator=act)
    assert again.ok and [c.status for c in again.components] == ["resumed", "done"]
    assert (root / "srv/b").read_text() == "y"


def test_the_cli_reports_a_killed_stream_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image, root = _image(tmp_path)
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


def _killed_once_on_b(comp: Any, index: int, root: Path, *args: Any) -> Any:
    """As _killed_on_b, the first time only: what a retry then finds."""
    mark = root / "killed-once"
    if comp.name == "b" and not mark.exists():
        mark.write_text("")
        return _killed_on_b(comp, index, root, *args)
    return _LAY_OUT_PIECE(comp, index, root, *args)


def test_with_retries_a_killed_stream_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, root = _image(tmp_path)
    monkeypatch.setattr(stream, "lay_out_piece", _killed_once_on_b)
    monkeypatch.setattr(layout_mod, "RETRY_WAITS", (0.0,))
    act, events = ActivatedUnits(), list[Event]()
    cfg = LayoutConfig(str(image), "all", root, streams=2, retries=2)
    res = layout(cfg, activator=act, emit=events.append)
    assert res.ok and [(c.name, c.status) for c in res.components] == [("a", "resumed"), ("b", "done")]
    assert (root / "opt/a").read_text() == "x" and (root / "srv/b").read_text() == "y"
    errors = [e for e in events if e["event"] == "error"]
    assert [(e["message"], e["fatal"]) for e in errors] == [
        (f"layout failed: b: {STREAM_DIED}; trying again in 0 s (try 2 of 3)", False)
    ]
    assert events[-1]["event"] == "done"
    assert sorted(act.units) == ["a.service", "a.service", "b.service"]  # a's again: a re-run's start
    machine = _served(events)  # done, not failed on the way
    assert machine.state is State.DONE and machine.error is None


def _served(events: list[Event]) -> Machine:
    """The machine as `bootenv serve` has it after the layout's events."""
    machine = assign("52:54:00:12:34:56", "img", "all", now=0.0)
    for e in [{"event": "os_written"}, *events]:
        outcome = apply(machine, parse_event(e), now=1.0)
        assert outcome.invalid is None, e
        machine = outcome.machine
    return machine


def test_out_of_budget_a_killed_stream_fails_the_machine_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, root = _image(tmp_path)
    monkeypatch.setattr(stream, "lay_out_piece", _killed_once_on_b)
    monkeypatch.setattr(layout_mod, "RETRY_BUDGET", 0.0)  # out of time: the retries are not used
    events = list[Event]()
    cfg = LayoutConfig(str(image), "all", root, streams=2, retries=3)
    res = layout(cfg, activator=ActivatedUnits(), emit=events.append)
    assert not res.ok
    assert [e["fatal"] for e in events if e["event"] == "error"] == [True]  # no try after the first
    machine = _served(events)
    assert machine.state is State.FAILED and machine.error == f"layout failed: b: {STREAM_DIED}"


def test_a_component_whose_dependency_failed_is_not_activated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its units would fail without what they need, and a failed unit is not tried again."""
    image, root = _image(tmp_path, a_depends_on_b=True)
    monkeypatch.setattr(stream, "lay_out_piece", _killed_on_b)
    act = ActivatedUnits()
    res = layout(LayoutConfig(str(image), "all", root, streams=2), activator=act)
    a, b = res.components
    assert (a.status, a.error, a.code) == ("failed", "not activated: it depends on b, which failed", 3)
    assert (root / "opt/a").read_text() == "x"  # its files are in all the same
    assert (b.status, b.code) == ("failed", RetryableError.exit_code)
    assert act.units == []
    failure = res.failure()
    assert failure is not None and failure.exit_code == RetryableError.exit_code
    assert layout_mod._retryable(failure, res)


def test_a_retry_activates_the_dependent_with_its_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, root = _image(tmp_path, a_depends_on_b=True)
    monkeypatch.setattr(stream, "lay_out_piece", _killed_once_on_b)
    monkeypatch.setattr(layout_mod, "RETRY_WAITS", (0.0,))
    act, events = ActivatedUnits(), list[Event]()
    res = layout(
        LayoutConfig(str(image), "all", root, streams=2, retries=1), activator=act, emit=events.append
    )
    assert res.ok and [(c.name, c.status) for c in res.components] == [("a", "resumed"), ("b", "done")]
    assert sorted(act.units) == ["a.service", "b.service"]  # each once: a waited for b
    assert _served(events).state is State.DONE


def test_retries_end_with_a_fatal_error_and_what_cannot_pass_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, root = _image(tmp_path)
    monkeypatch.setattr(layout_mod, "RETRY_WAITS", (0.0,))
    tries: list[int] = []
    real = layout_mod._layout

    def down(*args: Any) -> Any:  # the image server down for good
        tries.append(1)
        raise RetryableError("cannot fetch http://images/lamp/manifest.json: ConnectionError")

    monkeypatch.setattr(layout_mod, "_layout", down)
    events = list[Event]()
    with pytest.raises(RetryableError):
        layout(
            LayoutConfig(str(image), "all", root, retries=2), activator=ActivatedUnits(), emit=events.append
        )
    assert len(tries) == 3
    assert [e["fatal"] for e in events if e["event"] == "error"] == [False, False, True]
    assert events[-1]["message"] == "cannot fetch http://images/lamp/manifest.json: ConnectionError"

    def refused(*args: Any) -> Any:  # a bad signature: the same every time
        tries.append(1)
        raise VerificationError("manifest.json: signature does not verify")

    tries.clear()
    monkeypatch.setattr(layout_mod, "_layout", refused)
    with pytest.raises(VerificationError):
        layout(LayoutConfig(str(image), "all", root, retries=2), activator=ActivatedUnits())
    assert len(tries) == 1

    def once(*args: Any) -> Any:  # down for a moment
        monkeypatch.setattr(layout_mod, "_layout", real)
        raise RetryableError("cannot fetch: HTTP 503")

    monkeypatch.setattr(layout_mod, "_layout", once)
    res = layout(LayoutConfig(str(image), "all", root, retries=1), activator=ActivatedUnits())
    assert res.ok and (root / "srv/b").read_text() == "y"


@pytest.mark.parametrize(
    ("codes", "units", "again"),
    [
        ((3,), (), True),
        ((3, 3), (), True),
        ((3, 1), (), False),  # the other would fail the same way again
        ((1, 3), (), False),
        ((3, 4), (), False),  # data that did not verify
        ((3,), ("x.service",), False),  # a unit that did not start
        ((), ("x.service",), False),
    ],
)
def test_a_result_is_tried_again_only_if_every_failure_may_pass(
    codes: tuple[int, ...], units: tuple[str, ...], again: bool
) -> None:
    comps = tuple(ComponentResult(f"c{i}", "failed", error="e", code=c) for i, c in enumerate(codes))
    notes = tuple(f"{layout_mod.FAILED_UNIT}{u}" for u in units)
    result = LayoutResult((*comps, ComponentResult("ok", "done")), (), notes, 1.0)
    failure = result.failure()
    assert failure is not None
    assert layout_mod._retryable(failure, result) is again


def test_no_try_starts_that_would_run_past_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget counts the next try as long as the last: the first-boot unit kills a try
    that runs past its timeout, and a killed try posts no fatal error."""
    image, root = _image(tmp_path)
    monkeypatch.setattr(layout_mod, "RETRY_WAITS", (0.0,))
    tries: list[int] = []

    def slow(*args: Any) -> Any:
        tries.append(1)
        time.sleep(0.2)
        raise RetryableError("cannot fetch: HTTP 503")

    monkeypatch.setattr(layout_mod, "_layout", slow)
    cfg = LayoutConfig(str(image), "all", root, retries=5)
    monkeypatch.setattr(layout_mod, "RETRY_BUDGET", 0.3)  # one try fits; a second would not
    events = list[Event]()
    with pytest.raises(RetryableError):
        layout(cfg, activator=ActivatedUnits(), emit=events.append)
    assert len(tries) == 1 and [e["fatal"] for e in events if e["event"] == "error"] == [True]
    tries.clear()
    monkeypatch.setattr(layout_mod, "RETRY_BUDGET", 60.0)
    with pytest.raises(RetryableError):
        layout(cfg, activator=ActivatedUnits())
    assert len(tries) == 6


@pytest.mark.parametrize("during", ["a try", "the wait"])
def test_a_signal_is_posted_as_not_fatal_and_ends_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """Stopped (the system shutting down), the layout says so; the unit runs it again at
    the next boot, so the machine is not failed."""
    from bootenv.cli import TerminatedError

    image, root = _image(tmp_path)

    def stopped(*args: Any) -> Any:
        if during == "a try":
            raise TerminatedError
        raise RetryableError("cannot fetch: HTTP 503")

    def sleep(seconds: float) -> None:
        raise TerminatedError

    monkeypatch.setattr(layout_mod, "_layout", stopped)
    monkeypatch.setattr(layout_mod.time, "sleep", sleep)
    events = list[Event]()
    with pytest.raises(TerminatedError):
        layout(
            LayoutConfig(str(image), "all", root, retries=2), activator=ActivatedUnits(), emit=events.append
        )
    errors = [(e["message"], e["fatal"]) for e in events if e["event"] == "error"]
    assert errors[-1] == (layout_mod.STOPPED, False)
    assert len(errors) == (1 if during == "a try" else 2)  # the wait follows a try's error
    machine = _served(events)
    assert machine.state is not State.FAILED and machine.error is None


def test_past_its_deadline_the_layout_stops_and_fails_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first-boot unit's timeout would kill the layout unheard: its own deadline comes
    first, and is posted as fatal."""
    import signal

    image, root = _image(tmp_path)
    monkeypatch.setattr(layout_mod, "RETRY_WAITS", (30.0,))

    def down(*args: Any) -> Any:  # then the wait before the next try outlasts the deadline
        raise RetryableError("cannot fetch: HTTP 503")

    monkeypatch.setattr(layout_mod, "_layout", down)
    real_sleep = time.sleep
    waited_out = []

    def sleep(seconds: float) -> None:  # the clock's own: other threads' sleeps pass through
        real_sleep(seconds)
        if seconds == 30.0:
            waited_out.append(seconds)

    monkeypatch.setattr(layout_mod.time, "sleep", sleep)
    events = list[Event]()
    cfg = LayoutConfig(str(image), "all", root, retries=3, deadline=1)
    with pytest.raises(RetryableError, match="did not finish within its deadline of 1 s; a re-run resumes"):
        layout(cfg, activator=ActivatedUnits(), emit=events.append)
    assert waited_out == [], "stopped after its wait, not in it"
    errors = [(e["message"], e["fatal"]) for e in events if e["event"] == "error"]
    assert errors[-1] == ("layout did not finish within its deadline of 1 s; a re-run resumes", True)
    assert _served(events).state is State.FAILED
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # and its handler restored


def test_a_layout_within_its_deadline_is_untouched(tmp_path: Path) -> None:
    import signal

    image, root = _image(tmp_path)
    res = layout(LayoutConfig(str(image), "all", root, deadline=600), activator=ActivatedUnits())
    assert res.ok and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
