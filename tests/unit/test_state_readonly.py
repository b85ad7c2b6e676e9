"""`bootenv machines` reads the state directory and writes nothing to it.

Before, `machines --state gold` (a directory that is no state directory) printed "no
machines yet", exit 0, and made gold/events, gold/locks and gold/machines; reading a
machine's events made its lock file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bootenv.cli import main
from bootenv.machines import assign
from bootenv.state import Store

MAC = "52:54:00:00:00:01"


def test_machines_refuses_a_directory_that_is_no_state_directory_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gold/etc").mkdir(parents=True)
    assert main(["machines", "--state", str(tmp_path / "gold")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bootenv: error: {tmp_path}/gold is not a state directory (it has no machines/)")
    assert sorted(p.name for p in (tmp_path / "gold").iterdir()) == ["etc"]


def test_machines_reads_a_state_directory_without_making_a_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Store(tmp_path).put(assign(MAC, "lamp", "mysql", now=time.time()), note={"event": "assigned"})
    for lock in (tmp_path / "locks").iterdir():
        lock.unlink()
    (tmp_path / "locks").rmdir()
    assert main(["machines", "--state", str(tmp_path), "--json"]) == 0
    [machine] = json.loads(capsys.readouterr().out)
    assert machine["mac"] == MAC and [e["event"] for e in machine["log"]] == ["assigned"]
    assert not (tmp_path / "locks").exists()


def test_a_read_only_store_takes_a_lock_that_is_there(tmp_path: Path) -> None:
    Store(tmp_path).put(assign(MAC, "lamp", "mysql", now=time.time()), note={"event": "assigned"})
    store = Store(tmp_path, readonly=True)
    assert [e["event"] for e in store.events(MAC)] == ["assigned"]
    assert Store(tmp_path / "none", readonly=True).all() == []
    assert not (tmp_path / "none").exists()
