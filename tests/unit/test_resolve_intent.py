"""A `bootenv conflicts resolve` killed at any point is finished by the next one with the
same choice: its intent (the choice, and what the path holds once it is applied) is
written before anything else, and each step is done once (bootenv/resolvetemps.py). One
that asks for something else is refused, naming the one that was stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bootenv
from bootenv import conflicts, resolution
from bootenv.cli import main
from bootenv.conflicts import RECORDS
from bootenv.layout import LayoutConfig, layout
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image
from tests.unit.resolvekit import stop_at

OS, MINE = "os line\n", "component line\n"
# The steps each choice goes through, in order, and what it leaves: the file, and
# whether the stored version stays.
STEPS = {
    "merged": (("write_intent", "_replace_content", "remove_at", "save"), OS + MINE, False),
    "incoming": (("write_intent", "_put_incoming", "save"), MINE, False),
    "existing": (("write_intent", "remove_at", "save"), OS, False),
    "file": (("write_intent", "_replace_content", "save"), "the admin's\n", True),
}


def _conflict(tmp_path: Path) -> tuple[Path, str]:
    image = make_image(tmp_path / "img", [Comp("x", [d("usr"), f("usr/notes.txt", MINE)])])
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/notes.txt").write_text(OS)
    (x,) = layout(LayoutConfig(str(image), ("x",), root), activator=ActivatedUnits()).components
    (cid,) = x.conflicts
    (tmp_path / "mine").write_text("the admin's\n")
    return root, cid


def _args(tmp_path: Path, choice: str) -> tuple[str, ...]:
    return ("--file", str(tmp_path / "mine")) if choice == "file" else ("--keep", choice)


def _resolve(tmp_path: Path, root: Path, cid: str, choice: str) -> int:
    return main(["conflicts", "resolve", cid, *_args(tmp_path, choice), "--root", str(root)])


def _left(root: Path, cid: str) -> tuple[str, bool, str | None, list[str]]:
    """The file, whether the stored version is there, the resolution, what is left
    beside the records but them and the lock."""
    rec = conflicts.load(root, cid)
    extra = sorted(
        p.name for p in (root / RECORDS).iterdir() if p.name not in (f"{cid}.json", ".resolve.lock")
    )
    return (
        (root / "usr/notes.txt").read_text(),
        (root / rec.stored).exists(),
        (rec.resolution or {}).get("keep"),
        extra,
    )


@pytest.mark.parametrize(
    ("choice", "step"), [(choice, step) for choice, (steps, _, _) in STEPS.items() for step in steps]
)
def test_a_resolve_killed_after_any_step_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str, step: str
) -> None:
    root, cid = _conflict(tmp_path)
    real = getattr(resolution, step)

    def then_killed(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise KeyboardInterrupt(f"killed after {step}")

    with monkeypatch.context() as m:
        m.setattr(resolution, step, then_killed)
        with pytest.raises(KeyboardInterrupt):
            resolution.resolve(root, cid, *(None, tmp_path / "mine") if choice == "file" else (choice, None))
    assert _resolve(tmp_path, root, cid, choice) == 0
    _, text, stays = STEPS[choice]
    assert _left(root, cid) == (text, stays, choice, [])


def test_another_choice_is_refused_while_one_was_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, cid = _conflict(tmp_path)

    stop_at(monkeypatch, "remove_at", root, cid, "merged", None)
    for other in ("existing", "incoming", "file"):
        assert _resolve(tmp_path, root, cid, other) == 2
        err = capsys.readouterr().err
        assert f"conflict {cid}: a resolve --keep merged was stopped before it ended" in err
        assert err.count("\n") == 1
    assert _left(root, cid)[:3] == (OS + MINE, True, None)
    assert _resolve(tmp_path, root, cid, "merged") == 0
    assert _left(root, cid) == (OS + MINE, False, "merged", [])


def test_a_stopped_resolve_whose_outcome_cannot_be_made_again_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped after its intent, before the file was replaced; then the admin's file
    changed: the bytes it decided on are gone, and no others are put in place."""
    root, cid = _conflict(tmp_path)

    stop_at(monkeypatch, "_replace_content", root, cid, None, tmp_path / "mine")
    (tmp_path / "mine").write_text("changed since\n")
    assert _resolve(tmp_path, root, cid, "file") == 2
    err = capsys.readouterr().err
    assert "was stopped before it ended, and /usr/notes.txt or what it puts there has changed since" in err
    assert _left(root, cid) == (OS, True, None, [f"{cid}.intent"])


@pytest.mark.usefixtures("allow_run")
def test_a_merge_killed_by_sigkill_after_the_file_was_replaced_is_appended_once(tmp_path: Path) -> None:
    """A real kill -9 after the merge is in place, before the stored version went: the
    re-run neither appends the component's version again nor fails."""
    root, cid = _conflict(tmp_path)
    code = f"""
import os, signal, sys
from bootenv import resolution
real = resolution.remove_at
def remove_at(*args):
    real(*args)
    os.kill(os.getpid(), signal.SIGKILL)
resolution.remove_at = remove_at
from bootenv.cli import main
sys.exit(main(["conflicts", "resolve", {cid!r}, "--keep", "merged", "--root", {str(root)!r}]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(bootenv.__file__).resolve().parent.parent)}
    child = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert child.returncode == -signal.SIGKILL
    assert _left(root, cid) == (OS + MINE, False, None, [f"{cid}.intent"])
    assert _resolve(tmp_path, root, cid, "merged") == 0
    assert _left(root, cid) == (OS + MINE, False, "merged", [])
