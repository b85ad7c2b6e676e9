"""`bootenv serve`: which events and new records it takes (capped, atomically).

The MAX_MACHINES cap was checked outside any lock (concurrent callbacks from new MACs
all passed it) and not at all by a menu choice.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from bootenv import serve as serve_mod
from bootenv.machines import assign
from bootenv.serve import BootenvServer
from bootenv.state import Store
from tests.unit.test_serve import MAC, OTHER, get, post, server

__all__ = ["server"]  # the fixture, shared with test_serve.py


def test_a_menu_choice_past_the_cap_makes_no_record(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/tmp/exp/h8/select_bypass.py: at the cap, each GET of /ipxe/select for a new MAC
    made a record, whose callbacks were then taken."""
    monkeypatch.setattr(serve_mod, "MAX_MACHINES", 1)
    assert post(server, MAC, {"event": "start"})[0] == 200
    status, _, body = get(server, f"/ipxe/select/all?mac={OTHER}")
    assert status == 200 and "cannot record this choice" in body.decode() and "kernel " not in body.decode()
    assert Store(server.config.state).count() == 1
    assert not (server.config.state / "locks" / "52-54-00-ab-cd-ef.lock").exists()
    assert post(server, OTHER, {"event": "start"})[0] == 403


def test_new_machines_are_counted_one_at_a_time(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/tmp/exp/h8/maxmachines_race.py: callbacks from new MACs at once all passed the
    check before any record was made. Here the first to count waits until another
    counts too (or 2 s pass: what a lock makes it do): one record under the cap, two
    callbacks, one answered 200."""
    monkeypatch.setattr(serve_mod, "MAX_MACHINES", 2)
    assert post(server, MAC, {"event": "start"})[0] == 200
    count = Store.count
    counting = threading.Semaphore(0)
    first = threading.Lock()

    def meeting(self: Store) -> int:
        n = count(self)
        if first.acquire(blocking=False):
            counting.acquire(timeout=2)  # only another counter wakes it early
        else:
            counting.release()
        return n

    monkeypatch.setattr(Store, "count", meeting)
    answers: list[int] = []

    def new_machine(mac: str) -> None:
        answers.append(post(server, mac, {"event": "start"}, path=f"/callback/{mac}")[0])

    threads = [threading.Thread(target=new_machine, args=(m,)) for m in (OTHER, "52:54:00:00:00:03")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == [200, 403]
    monkeypatch.setattr(Store, "count", count)
    assert Store(server.config.state).count() == 2


def test_the_store_caps_new_records_and_only_those(tmp_path: Path) -> None:
    from bootenv.machines import parse_event
    from bootenv.serve import _unknown_machine
    from bootenv.state import StoreFullError

    store = Store(tmp_path)
    start: dict[str, Any] = {"event": "start"}
    store.update(MAC, parse_event(start), start, create=_unknown_machine, limit=1)
    with pytest.raises(StoreFullError, match="assign it first"):
        store.update(OTHER, parse_event(start), start, create=_unknown_machine, limit=1)
    with pytest.raises(StoreFullError):
        store.put(assign(OTHER, "lamp", "all", now=1.0), limit=1)
    assert store.update(MAC, parse_event(start), start, create=_unknown_machine, limit=1).machine.events == 2
    assert store.put(assign(MAC, "lamp", "all", now=1.0), limit=1)  # not new: not counted
    assert store.put(assign(OTHER, "lamp", "all", now=1.0))  # the admin's: no cap
    assert store.count() == 2
