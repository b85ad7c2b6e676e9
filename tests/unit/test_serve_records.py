"""`bootenv serve`: which events and new records it takes.

Events belong to an assignment. Before, an event carried nothing tying it to one: the
old run's `write-os done`, posted after the admin re-assigned the machine, marked the
new assignment os_written, and the machine booted its disk instead of being
provisioned. New records are capped, atomically: the MAX_MACHINES cap was checked
outside any lock (concurrent callbacks from new MACs all passed it) and not at all by
a menu choice.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bootenv import callback
from bootenv import serve as serve_mod
from bootenv.callback import Callback
from bootenv.endpoints import Handler
from bootenv.machine_record import to_dict
from bootenv.machines import State, assign
from bootenv.serve import BootenvServer
from bootenv.state import Store
from tests.unit.test_serve import MAC, OTHER, callback_path, get, post, script, server

__all__ = ["server"]  # the fixture, shared with test_serve.py

# The agent's word that the disk boots (once its boot loaders are in).
WRITTEN = {"event": "os_written", "data": {"disk": "/dev/vda"}, "seq": 2, "time": 101.0}


def test_the_ramdisk_posts_to_its_assignments_own_callback_url(server: BootenvServer) -> None:
    store = Store(server.config.state)
    store.put(assign(MAC, "lamp", "mysql", now=time.time()))
    first = store.get(MAC)
    assert first is not None and first.assignment
    assert f"bootenv.callback={server.base_url}/callback/{MAC}/{first.assignment} " in script(server, MAC)
    store.put(assign(MAC, "lamp", "mysql", now=time.time()))  # the same again: a new assignment
    second = store.get(MAC)
    assert second is not None and second.assignment not in (None, first.assignment)
    assert f"/callback/{MAC}/{second.assignment} " in script(server, MAC)


def test_a_replaced_runs_events_do_not_touch_the_new_assignment(server: BootenvServer) -> None:
    """/tmp/exp/h8/reassign_stale.sh: assign lamp, its agent starts, re-assign rack, then
    the old agent's os_written. The machine must still install rack."""
    store = Store(server.config.state)
    store.put(assign(MAC, "lamp", "all", now=time.time()))
    old = callback_path(server, MAC)
    assert post(server, MAC, {"event": "start", "seq": 1, "time": 100.0})[1]["state"] == "provisioning"
    make_rack(server)
    store.put(assign(MAC, "rack", "none", now=time.time()), note={"event": "assigned"})
    status, answer = post(server, MAC, WRITTEN, path=old)
    assert status == 409 and "assigned again" in answer["error"] and answer["replaced"] is True
    status, answer = post(server, MAC, WRITTEN, path=f"/callback/{MAC}")  # a URL naming none
    # An agent run by hand is refused, not told its run was replaced: it is not stopped.
    assert status == 409 and "names no assignment" in answer["error"] and answer["replaced"] is False
    machine = store.get(MAC)
    assert machine is not None and (machine.image, machine.state, machine.events) == (
        "rack",
        State.ASSIGNED,
        0,
    )
    assert [e["event"] for e in store.events(MAC)][-1] == "assigned"  # nothing logged
    text = script(server, MAC)
    assert "bootenv.image=" in text and "/images/rack " in text and "sanboot" not in text
    # The new assignment's own run is heard, from its first event on.
    assert post(server, MAC, WRITTEN)[1]["state"] == "os_written"


def test_a_menu_choice_is_an_assignment_too(server: BootenvServer) -> None:
    body = get(server, f"/ipxe/select/all?mac={OTHER}")[2]
    machine = Store(server.config.state).get(OTHER)
    assert machine is not None and machine.assignment
    assert f"bootenv.callback={server.base_url}/callback/{OTHER}/{machine.assignment} " in body.decode()
    assert post(server, OTHER, {"event": "os_written"}, path=f"/callback/{OTHER}")[0] == 409
    assert post(server, OTHER, {"event": "os_written"})[0] == 200


def test_a_record_from_before_assignment_ids_hears_the_url_without_one(server: BootenvServer) -> None:
    """A machine an older bootenv assigned (its agent may be running: its URL names no
    assignment) is heard as before, and its script's URL names none."""
    doc = to_dict(assign(MAC, "lamp", "mysql", now=time.time()))
    del doc["assignment"]
    (server.config.state / "machines" / "52-54-00-12-34-56.json").write_text(json.dumps(doc))
    assert f"bootenv.callback={server.base_url}/callback/{MAC} " in script(server, MAC)
    assert post(server, MAC, {"event": "start"}) == (
        200,
        {"state": "provisioning", "changed": True, "invalid": None},
    )
    assert post(server, MAC, {"event": "done"}, path=f"/callback/{MAC}/0123456789abcdef")[0] == 409


def test_an_assignment_of_a_machine_with_no_record_makes_nothing(server: BootenvServer) -> None:
    """A run whose record was removed since (or an id made up): 409, and no file at all."""
    status, answer = post(server, OTHER, {"event": "start"}, path=f"/callback/{OTHER}/0123456789abcdef")
    # Not "replaced": a serve restarted on an empty --state must not stop every agent
    # running (each would wipe the disk it was writing).
    assert status == 409 and "no record" in answer["error"] and answer["replaced"] is False
    assert not list(server.config.state.glob("*/52-54-00-ab-cd-ef*"))


@pytest.mark.parametrize("tail", ["/", "/xyz", "/0123456789ABCDEF", "/0123456789abcdef/more"])
def test_a_malformed_assignment_in_the_url_is_a_400(server: BootenvServer, tail: str) -> None:
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    status, answer = post(server, MAC, {"event": "start"}, path=f"/callback/{MAC}{tail}")
    assert status == 400 and "assignment id" in answer["error"]


def test_the_agent_of_a_replaced_run_gives_up_at_the_first_409(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bootenv/callback.py takes a 409 as an answer, not a busy server: one attempt,
    never a retry loop, and none for the run's next events, which serve would refuse
    too; the reason is kept, for the agent to stop (tests/unit/test_agent_reassigned.py)."""
    monkeypatch.setattr(callback, "RETRY_WAIT", 0.05)
    posts: list[str] = []
    handle = Handler.do_POST

    def counted(self: Handler) -> None:
        posts.append(self.path)
        handle(self)

    monkeypatch.setattr(Handler, "do_POST", counted)
    store = Store(server.config.state)
    store.put(assign(MAC, "lamp", "all", now=time.time()))
    url = server.base_url + callback_path(server, MAC)
    store.put(assign(MAC, "lamp", "none", now=time.time()))
    cb = Callback(url, "agent")
    for _ in range(3):
        cb.post("progress", step="write-os", bytes=1)
    cb.close()
    assert len(posts) == 1
    assert cb.superseded is not None and "was assigned again since assignment" in cb.superseded
    machine = store.get(MAC)
    assert machine is not None and machine.events == 0


def make_rack(srv: BootenvServer) -> None:
    from tests.serveimage import make_image

    make_image(srv.config.images, "rack", {})


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
    from bootenv.event_schema import parse_event
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
