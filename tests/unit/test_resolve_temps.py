"""A `bootenv conflicts resolve` killed between writing its temp file and renaming it
leaves `.bootenv~resolve.<pid>` beside the file: the next resolve removes it, under the
records' lock, and nothing else (bootenv/resolvetemps.py). A resolve that is running
keeps its temp: the next one waits for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bootenv
from bootenv.cli import main
from bootenv.conflicts import RECORDS, STORE, conflict_id

A, B, C = "etc/x/a", "opt/b", "lnk/c"  # C's directory is a symlink out of the root


def _conflict(root: Path, relpath: str) -> str:
    cid = conflict_id("c", relpath)
    doc: dict[str, object] = {
        "id": cid,
        "component": "c",
        "path": relpath,
        "reason": "differs",
        "existing": {},
        "incoming": {},
        "stored": f"{STORE}/c/{relpath}",
        "resolution": None,
    }
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    (root / RECORDS / f"{cid}.json").write_text(json.dumps(doc))
    if not (root / relpath).parent.is_symlink():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text("the admin's\n")
    (root / STORE / "c" / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / STORE / "c" / relpath).write_text("incoming\n")
    return cid


def _resolution(root: Path, cid: str) -> dict[str, str] | None:
    res: dict[str, str] | None = json.loads((root / RECORDS / f"{cid}.json").read_text())["resolution"]
    return res


def _resolve_in_child(root: Path, cid: str, file: Path, then: str) -> subprocess.Popen[bytes]:
    """A real `bootenv conflicts resolve --file` in a process of its own, which runs
    `then` (Python) right after it has written its temp file, before the rename."""
    code = f"""
import os, signal, sys
import bootenv.writeback as wb
real = wb.write_all
def write_all(fd, data):
    real(fd, data)
    {then}
wb.write_all = write_all
from bootenv.cli import main
sys.exit(main(["conflicts", "resolve", {cid!r}, "--file", {str(file)!r}, "--root", {str(root)!r}]))
"""
    return subprocess.Popen([sys.executable, "-c", code], env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(bootenv.__file__).resolve().parent.parent)}


@pytest.mark.usefixtures("allow_run")
def test_the_next_resolve_removes_a_killed_resolves_temp_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    a, b = _conflict(root, A), _conflict(root, B)
    (tmp_path / "outside").mkdir()
    (root / "lnk").symlink_to(tmp_path / "outside")
    _conflict(root, C)
    new = tmp_path / "new"
    new.write_text("the new version\n")
    (root / "etc/x/a").chmod(0o600)

    killed = _resolve_in_child(root, a, new, "os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    temp = root / f"etc/x/.bootenv~resolve.{killed.pid}"
    assert temp.read_text() == "the new version\n" and temp.stat().st_mode & 0o777 == 0o600
    assert (root / A).read_text() == "the admin's\n" and _resolution(root, a) is None

    # What is not a killed resolve's temp: other names, not a regular file, or in a
    # directory no record names (and so no resolve wrote in), or out of the root.
    keep = [
        root / "etc/x/.bootenv~resolve.conf",
        root / "etc/x/.bootenv~resolve.12.bak",
        root / "etc/x/.bootenv~resolve.",
        root / "etc/x/bootenv~resolve.13",
        root / "srv/.bootenv~resolve.14",
        tmp_path / "outside/.bootenv~resolve.15",
    ]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the admin's\n")
    (root / "etc/x/.bootenv~resolve.16").mkdir()
    (root / "etc/x/.bootenv~resolve.17").symlink_to(tmp_path / "outside/.bootenv~resolve.15")

    capsys.readouterr()
    assert main(["conflicts", "resolve", b, "--keep", "existing", "--root", str(root)]) == 0
    assert not temp.exists()
    assert f"removed 1 temp files killed resolves left: /etc/x/{temp.name}" in capsys.readouterr().err
    assert all(path.read_text() == "the admin's\n" for path in keep)
    assert (root / "etc/x/.bootenv~resolve.16").is_dir()
    assert (root / "etc/x/.bootenv~resolve.17").is_symlink()
    assert (_resolution(root, b) or {}).get("keep") == "existing"

    # The killed run's conflict is still open, and resolves as it would have.
    assert main(["conflicts", "resolve", a, "--file", str(new), "--root", str(root)]) == 0
    assert (root / A).read_text() == "the new version\n"
    assert sorted(p.name for p in (root / "etc/x").iterdir() if p.name.startswith(".bootenv~resolve.1")) == [
        ".bootenv~resolve.12.bak",
        ".bootenv~resolve.16",
        ".bootenv~resolve.17",
    ]


@pytest.mark.usefixtures("allow_run")
def test_a_resolve_waits_for_one_running_and_leaves_its_temp_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    a, b = _conflict(root, A), _conflict(root, B)
    new = tmp_path / "new"
    new.write_text("the new version\n")
    go, wrote = tmp_path / "go", tmp_path / "wrote"
    os.mkfifo(go)
    first = _resolve_in_child(root, a, new, f"open({str(wrote)!r}, 'w').close(); open({str(go)!r}).read()")
    running = [first]
    try:
        deadline = time.monotonic() + 60
        while not wrote.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first resolve made no temp"
            time.sleep(0.05)
        temp = root / f"etc/x/.bootenv~resolve.{first.pid}"
        assert temp.is_file()
        second = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bootenv",
                "conflicts",
                "resolve",
                b,
                "--keep",
                "incoming",
                "--root",
                str(root),
            ],
            env=_env(),
        )
        running.append(second)
        time.sleep(2)  # time to start, and to take the temp if it did not wait for the lock
        assert second.poll() is None and temp.is_file()
    except BaseException:
        for proc in running:
            proc.kill()
        raise
    with open(go, "w") as f:  # the first resolve goes on
        f.write("go")
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert (root / A).read_text() == "the new version\n" and (root / B).read_text() == "incoming\n"
    assert not temp.exists()
    assert (_resolution(root, a) or {}).get("keep") == "file"
    assert (_resolution(root, b) or {}).get("keep") == "incoming"
