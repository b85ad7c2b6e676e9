"""The machine state machine, event validation, and the durable store."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootenv import state, taken
from bootenv.errors import UserError
from bootenv.event_schema import EventError, Kind, parse_event
from bootenv.machine_record import from_dict, to_dict
from bootenv.machines import (
    ORDER,
    Machine,
    State,
    apply,
    assign,
    check_components,
    check_image,
    normalize_mac,
    superseded,
)
from bootenv.serve import _unknown_machine
from bootenv.state import Store

MAC = "52:54:00:12:34:56"


def fresh() -> Machine:
    return assign(MAC, "lamp", "mysql", now=100.0)


def feed(machine: Machine, *docs: dict[str, Any]) -> Machine:
    for i, doc in enumerate(docs):
        machine = apply(machine, parse_event(doc), now=101.0 + i).machine
    return machine


HAPPY = [
    {"event": "start"},
    {"event": "step", "step": "partition", "status": "start"},
    {"event": "step", "step": "partition", "status": "done", "elapsed": 0.4},
    {"event": "progress", "step": "write-os", "bytes": 10, "total": 100},
    {"event": "os_written", "data": {"disk": "/dev/vda"}},
    {"event": "step", "step": "handoff", "status": "start"},
    {"event": "os_booted", "source": "layout"},
    {"event": "step", "source": "layout", "step": "mysql", "status": "start", "component": "mysql"},
    {"event": "conflict", "source": "layout", "component": "mysql", "path": "/etc/x.conf"},
    {"event": "components_laid_out", "source": "layout"},
    {"event": "done", "source": "layout"},
]


def test_the_happy_path_walks_every_state_in_order() -> None:
    machine = fresh()
    states = [machine.state]
    for doc in HAPPY:
        machine = feed(machine, doc)
        if machine.state is not states[-1]:
            states.append(machine.state)
    assert tuple(states) == ORDER
    assert [m.state for m in machine.timeline] == list(ORDER)
    assert machine.conflicts == 1
    assert machine.invalid == 0
    assert machine.events == len(HAPPY)
    assert machine.reached(State.OS_WRITTEN) == 101.0 + 0  # each feed restarts its clock at 101


# What the agent posts up to its last step: the disk can boot only once they are done.
AGENT_STEPS = [
    {"event": "step", "step": step, "status": status}
    for step in ("partition", "write-os", "filesystems", "configure", "runtime", "bootloader")
    for status in ("start", "done")
]


def test_the_disk_is_not_taken_as_bootable_before_the_agent_says_so() -> None:
    """The end of write-os was os_written, and serve answered the machine's network
    boots with its disk from then on: cut off (a power cut, a reset) while the agent grew
    the filesystem, made the ESP or installed grub, it booted nothing, was never
    provisioned again, and showed no error."""
    for n in range(1, len(AGENT_STEPS) + 1):
        machine = feed(fresh(), {"event": "start"}, *AGENT_STEPS[:n])
        assert (machine.state, machine.error) == (State.PROVISIONING, None), AGENT_STEPS[n - 1]
    machine = feed(machine, {"event": "os_written", "data": {"disk": "/dev/vda"}})
    assert machine.state is State.OS_WRITTEN and machine.invalid == 0
    after = feed(machine, {"event": "step", "step": "handoff", "status": "start"})
    assert (after.state, after.timeline, after.invalid) == (State.OS_WRITTEN, machine.timeline, 0)


def test_an_agent_without_the_os_written_event_is_bootable_at_its_hand_off() -> None:
    """An agent older than its os_written event (a ramdisk built before serve was
    upgraded) starts its hand-off once the disk boots: that stands for the event, or a
    reboot hand-off would find the machine provisioning, and provision it again."""
    handoff = {"event": "step", "step": "handoff", "status": "start"}
    machine = feed(fresh(), {"event": "start"}, *AGENT_STEPS, handoff)
    assert machine.state is State.OS_WRITTEN and machine.invalid == 0
    # The layout service's step of that name is its own.
    assert feed(fresh(), {**handoff, "source": "layout"}).state is State.OS_BOOTED


def test_steps_alone_drive_the_state() -> None:
    machine = feed(
        fresh(),
        {"event": "step", "step": "write-os", "status": "start"},
        {"event": "step", "step": "write-os", "status": "done"},
        {"event": "step", "step": "handoff", "status": "start"},
        {"event": "progress", "source": "layout", "step": "mysql", "bytes": 5},
        {"event": "step", "source": "layout", "step": "layout", "status": "done"},
    )
    assert [m.state for m in machine.timeline] == [
        State.ASSIGNED,
        State.PROVISIONING,
        State.OS_WRITTEN,
        State.OS_BOOTED,
        State.COMPONENTS_LAID_OUT,
    ]


def test_a_lost_callback_does_not_wedge_the_machine() -> None:
    machine = feed(fresh(), {"event": "os_written"})
    assert machine.state is State.OS_WRITTEN
    assert machine.invalid == 0


@pytest.mark.parametrize(
    "doc",
    [{"event": "error", "message": "disk too small"}, {"event": "step", "step": "x", "status": "failed"}],
)
def test_failure_from_any_live_state(doc: dict[str, Any]) -> None:
    for n in range(len(HAPPY) - 1):
        machine = feed(fresh(), *HAPPY[:n], doc)
        assert machine.state is State.FAILED
        assert machine.error
    machine = feed(fresh(), {"event": "error", "message": "retrying", "fatal": False})
    assert machine.state is State.ASSIGNED


def test_invalid_transitions_are_recorded_not_raised() -> None:
    machine = feed(fresh(), {"event": "os_booted"})
    out = apply(machine, parse_event({"event": "os_written"}), now=200.0)
    assert out.invalid and "back" in out.invalid
    assert out.machine.state is State.OS_BOOTED
    assert out.machine.invalid == 1
    done = feed(fresh(), {"event": "done"})
    out = apply(done, parse_event({"event": "error", "message": "late"}), now=300.0)
    assert out.machine.state is State.DONE and out.invalid and "final" in out.invalid
    failed = feed(fresh(), {"event": "error"})
    assert apply(failed, parse_event({"event": "done"}), now=1.0).machine.state is State.FAILED


def test_chatter_that_implies_an_earlier_state_is_not_invalid() -> None:
    machine = feed(fresh(), {"event": "os_written"}, {"event": "step", "step": "handoff", "status": "start"})
    assert machine.state is State.OS_WRITTEN
    booted = feed(machine, {"event": "os_booted", "source": "layout"}, {"event": "progress", "bytes": 1})
    assert booted.state is State.OS_BOOTED
    assert machine.invalid == booted.invalid == 0


@settings(deadline=None)  # the machine is shared and noisy; this is about logic, not speed
@given(st.lists(st.sampled_from([k.value for k in Kind]), max_size=30))
def test_any_event_sequence_only_moves_forward(kinds: list[str]) -> None:
    machine = fresh()
    for kind in kinds:
        doc: dict[str, Any] = {"event": kind}
        if kind == "step":
            doc |= {"step": "write-os", "status": "done"}
        before = machine.state
        machine = apply(machine, parse_event(doc), now=1.0).machine
        if before in (State.DONE, State.FAILED):
            assert machine.state is before
        elif machine.state is not State.FAILED:
            assert ORDER.index(machine.state) >= ORDER.index(before)
    marks = [m.state for m in machine.timeline]
    assert len(marks) == len(set(marks))
    assert from_dict(json.loads(json.dumps(to_dict(machine)))) == machine


def _nested(levels: int) -> dict[str, Any]:
    """An event's data with `levels` objects and lists, one in the other."""
    value: Any = "x"
    for i in range(levels - 1):
        value = [value] if i % 2 else {"k": value}
    return {"k": value}


def test_data_nested_up_to_the_limit_is_taken_and_served() -> None:
    deep = _nested(32)
    assert parse_event({"event": "error", "data": deep}).data == deep


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "JSON object"),
        ({"event": "reboot"}, "unknown event"),
        ({}, "unknown event"),
        ({"event": "start", "colour": 1}, "unknown key 'colour'"),
        ({"event": "step", "step": "x"}, "needs 'step' and 'status'"),
        ({"event": "step", "step": "x", "status": "paused"}, "status"),
        ({"event": "progress", "bytes": -1}, "non-negative"),
        ({"event": "progress", "bytes": True}, "non-negative"),
        ({"event": "progress", "elapsed": float("nan")}, "non-negative"),
        ({"event": "progress", "elapsed": 10**400}, "non-negative"),  # JSON integers have no bound
        ({"event": "progress", "seq": 1, "time": float("nan")}, "time must be"),
        ({"event": "progress", "seq": 1, "time": 10**400}, "time must be"),
        ({"event": "progress", "seq": 1, "time": "now"}, "time must be"),
        ({"event": "start", "source": "bios"}, "source"),
        ({"event": "conflict", "component": "../x"}, "component name"),
        ({"event": "error", "message": "x" * 5000}, "too long"),
        ({"event": "error", "data": []}, "an object"),
        ({"event": "error", "data": _nested(33)}, "nested more than 32 levels"),
    ],
)
def test_malformed_events_are_refused(doc: object, message: str) -> None:
    with pytest.raises(EventError, match=message):
        parse_event(doc)


@pytest.mark.parametrize(
    "text", ["52:54:00:12:34:56", "52-54-00-12-34-56", "525400123456", " 52:54:00:12:34:56"]
)
def test_mac_forms_normalise(text: str) -> None:
    assert normalize_mac(text.upper()) == MAC


@pytest.mark.parametrize("text", ["", "52:54:00:12:34", "52:54:00:12:34:5g", "52:54-00:12:34:56", "x" * 17])
def test_malformed_macs_are_refused(text: str) -> None:
    with pytest.raises(UserError):
        normalize_mac(text)


@pytest.mark.parametrize(
    ("image", "components"), [("../x", "all"), ("lamp", "a b"), ("lamp", "a,a"), ("http://x/$y", "all")]
)
def test_bad_assignments_are_refused(image: str, components: str) -> None:
    with pytest.raises(UserError):
        assign(MAC, image, components, now=0.0)


def test_store_keeps_records_and_an_append_only_event_log(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assigned = fresh()
    store.put(assigned, note={"event": "assigned"})
    for doc in HAPPY[:5]:
        store.update(
            MAC.upper(), parse_event(doc), doc, create=_unknown_machine, assignment=assigned.assignment
        )
    again = Store(tmp_path)  # a restarted server sees the same state
    machine = again.get(MAC)
    assert machine is not None and machine.state is State.OS_WRITTEN
    events = again.events(MAC)
    assert [e["event"] for e in events] == ["assigned"] + [d["event"] for d in HAPPY[:5]]
    assert events[-1]["state"] == "os_written"
    assert not [p for p in (tmp_path / "machines").iterdir() if p.name.startswith(".")]  # no temp left
    # A torn last line (power cut mid-append) is skipped, not fatal.
    with open(tmp_path / "events" / "52-54-00-12-34-56.jsonl", "a") as f:
        f.write('{"event": "prog')
    assert len(again.events(MAC)) == 6
    assert [m.mac for m in again.all()] == [MAC]
    # The next event is a line of its own, not glued to the fragment and lost with it.
    again.update(
        MAC, parse_event(HAPPY[5]), HAPPY[5], create=_unknown_machine, assignment=assigned.assignment
    )
    assert [e["event"] for e in again.events(MAC)][-2:] == [HAPPY[4]["event"], HAPPY[5]["event"]]


def test_an_events_log_is_bounded_and_read_back_whole_or_by_its_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chatty or hostile sender cannot grow a machine's log without bound: past
    LOG_LIMIT it is rotated, the rotation before that dropped."""
    monkeypatch.setattr(state, "LOG_LIMIT", 2000)
    store = Store(tmp_path)
    docs = [{"event": "progress", "bytes": i, "message": "x" * 100} for i in range(60)]
    for doc in docs:
        store.update(MAC, parse_event(doc), doc, create=_unknown_machine)
    logs = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert logs == ["52-54-00-12-34-56.jsonl", "52-54-00-12-34-56.jsonl.1"]
    assert all((tmp_path / "events" / name).stat().st_size <= 2000 for name in logs)
    kept = [e["bytes"] for e in store.events(MAC)]
    assert kept == list(range(60 - len(kept), 60)) and 10 <= len(kept) < 60  # the newest, in order
    tail = [e["bytes"] for e in store.events(MAC, budget=700)]
    assert tail == kept[-len(tail) :] and 3 <= len(tail) <= 5  # whole lines only
    machine = store.get(MAC)
    assert machine is not None and machine.events == 60  # the record counts them all


def test_events_are_read_by_who_may_not_write_the_lock_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bootenv machines --json` as a user who can read the state but not write it."""
    store = Store(tmp_path)
    store.update(MAC, parse_event(HAPPY[0]), HAPPY[0], create=_unknown_machine)
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert [e["event"] for e in store.events(MAC)] == ["start"]


def test_store_remembers_a_few_names_per_sender_for_the_last_senders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names are kept for the last SENDERS senders, the last REMEMBERED of each: a sender
    has one event in flight, so its attempts meet one of its last names; memory stays
    bounded however many MACs post, and a sender forgotten has its names read back from
    its log."""
    monkeypatch.setattr(taken, "SENDERS", 3)
    monkeypatch.setattr(taken, "REMEMBERED", 2)
    store = Store(tmp_path)

    def send(mac: str, seq: int) -> bool:
        doc = {"event": "progress", "seq": seq, "time": 1795000000.5}
        return store.update(mac, parse_event(doc), doc, create=_unknown_machine).repeated

    macs = [f"52:54:00:00:00:0{i}" for i in range(3)]
    assert not any(send(mac, 1) for mac in macs)
    assert all(send(mac, 1) for mac in macs)
    assert not send(MAC, 1) and not send(MAC, 2) and not send(MAC, 3)  # a fourth sender: the first goes
    assert send(MAC, 2) and send(MAC, 3) and not send(MAC, 1)  # the last two of its names; 1 is new again
    assert len(store._taken._names) == 3  # macs[0], the oldest sender, was let go
    assert send(macs[0], 1)  # ... and its names read back from its log when it came back
    assert len(state.Store(tmp_path).events(MAC)) == 4


def test_a_restarted_store_takes_no_event_twice(tmp_path: Path) -> None:
    """An attempt that spans a restart of serve (its answer lost as serve stopped) is
    known by the new process: the sender's last names are read back from its log."""
    first = {"event": "start", "seq": 1, "time": 1795000000.25}
    layout = {"event": "os_booted", "source": "layout", "seq": 1, "time": 1795000100.5}
    before = Store(tmp_path)
    for doc in (first, layout):
        assert not before.update(MAC, parse_event(doc), doc, create=_unknown_machine).repeated
    with open(tmp_path / "events" / "52-54-00-12-34-56.jsonl", "a") as f:
        # What an older serve logged: a time too big for a float, and not an object.
        f.write('{"event":"progress","seq":9,"time":1' + "0" * 400 + "}\n[]\n")
    after = Store(tmp_path)  # serve started again
    for doc in (first, layout):
        assert after.update(MAC, parse_event(doc), doc, create=_unknown_machine).repeated
    other = {**layout, "time": 1795000200.5}  # the layout run again: a new sender, seq 1 again
    assert not after.update(MAC, parse_event(other), other, create=_unknown_machine).repeated
    assert len(after.events(MAC)) == 5


def test_store_tracks_a_machine_nobody_assigned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    out = store.update(
        "aa:bb:cc:dd:ee:ff", parse_event({"event": "start"}), {"event": "start"}, create=_unknown_machine
    )
    assert out.machine.state is State.PROVISIONING
    assert out.machine.image == ""


@pytest.mark.parametrize("args", ["quiet ; chain http://x/y", "a || b", "#x", "a\\b", "${x}"])
def test_kernel_arguments_that_would_change_the_ipxe_script_are_refused(args: str) -> None:
    with pytest.raises(UserError, match="iPXE"):
        assign("52:54:00:12:34:56", "lamp", "all", now=0.0, kernel_args=args)


@pytest.mark.parametrize("args", ["console=tty0;reboot", "console=ttyS0{x}", "earlyprintk=a|b"])
def test_kernel_arguments_the_agent_would_refuse_to_pass_on_are_refused_at_assign(args: str) -> None:
    """The agent passes console= and the like on to grub.cfg and kexec, unquoted: what it
    would refuse at boot is refused now."""
    with pytest.raises(UserError, match=r"grub\.cfg cannot take"):
        assign("52:54:00:12:34:56", "lamp", "all", now=0.0, kernel_args=args)


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (check_components, "web,my\nsql"),
        (check_image, "lamp\n"),
        (check_image, "http://cdn/img\\x"),  # a backslash: iPXE's quoting
        (check_image, "http://cdn/img\x7f"),
        (check_image, "http://[bad/img"),
        (check_image, "http://cdn/\u00e9"),
    ],
)
def test_names_and_urls_that_cannot_reach_the_agent_intact_are_refused(check: Any, value: str) -> None:
    with pytest.raises(UserError):
        check(value)


@pytest.mark.parametrize("dies", ["_write", "_append"])
def test_a_serve_killed_while_it_takes_an_event_takes_the_senders_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    """serve dies between writing the machine's record and logging the event (or during
    either): the restarted serve applies the sender's retry, and the machine's state is
    the event's."""
    start = {"event": "start", "seq": 1, "time": 1795000000.25}
    done = {"event": "done", "source": "layout", "seq": 1, "time": 1795000100.5}
    before = Store(tmp_path)
    before.update(MAC, parse_event(start), start, create=_unknown_machine)
    real = getattr(Store, dies)

    def crash(self: Store, *args: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(Store, dies, crash)
    with pytest.raises(SystemExit):
        before.update(MAC, parse_event(done), done, create=_unknown_machine)
    monkeypatch.setattr(Store, dies, real)
    after = Store(tmp_path)  # serve started again; the sender, unanswered, retries
    out = after.update(MAC, parse_event(done), done, create=_unknown_machine)
    assert not out.repeated
    got = after.get(MAC)
    assert got is not None and got.state.value == "done"
    assert [e["event"] for e in after.events(MAC)] == ["start", "done"]
    assert after.update(MAC, parse_event(done), done, create=_unknown_machine).repeated  # and once only


@pytest.mark.parametrize(
    ("hostname", "kernel_args", "words"),
    [
        ("web1 ; chain http://127.0.0.1:1/evil.ipxe", "", "not a valid host name"),
        ("web1 bootenv.disk=/dev/sdz", "", "not a valid host name"),  # an argument of its own
        ("bad host", "", "not a valid host name"),
        ("bad\x1b]0;x\x07host", "", "bad\\x1b]0;x\\x07host is not a valid host name"),
        ("web1." + "a" * 60, "", "over the kernel's 64"),
        (None, "a\udcffb", "a\\xffb holds a character that is not printable ASCII"),
        (None, "quiet \u00e9", "not printable ASCII"),
        (None, "a\x1b]0;x\x07b", "a\\x1b]0;x\\x07b holds a control character"),
        (None, "quiet ; chain http://x/y", "ends an iPXE command"),
    ],
)
def test_assign_refuses_what_cannot_go_into_the_machines_ipxe_script(
    hostname: str | None, kernel_args: str, words: str
) -> None:
    with pytest.raises(UserError) as caught:
        assign(MAC, "lamp", "all", now=1.0, hostname=hostname, kernel_args=kernel_args)
    assert words in caught.value.message and "\x1b" not in caught.value.message


def test_assigned_host_name_and_kernel_args_make_a_script() -> None:
    from bootenv import menu

    m = assign(MAC, "lamp", "all", now=1.0, hostname="web1.example.com", kernel_args="quiet loglevel=3")
    spec = menu.BootSpec(
        base_url="http://10.0.0.1:8080",
        mac=m.mac,
        image_url="http://10.0.0.1:8080/images/lamp",
        components=m.components,
        hostname=m.hostname,
        kernel_args=m.kernel_args,
    )
    assert "bootenv.hostname=web1.example.com quiet loglevel=3" in menu.provision_script(spec)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostname", "web1 bootenv.disk=/dev/sdz"),
        ("hostname", 5),
        ("kernel_args", "a\udcffb"),
        ("kernel_args", "x ; chain y"),
    ],
)
def test_a_record_edited_into_what_no_script_can_hold_is_damaged(field: str, value: object) -> None:
    """assign refuses these; a record edited by hand (or by an older bootenv) is held to
    the same, so the request that reads it fails in one line, not with a traceback."""
    doc = to_dict(assign(MAC, "lamp", "all", now=1795000000.0, hostname="db1"))
    doc[field] = value
    with pytest.raises(UserError, match="is damaged"):
        from_dict(doc)


def test_components_are_taken_with_spaces_as_the_catalog_takes_them(tmp_path: Path) -> None:
    """`--components "mysql, php"` was refused as `bootenv.components: '' is not a
    component name`: the boot arguments were checked before the names were normalised."""
    from bootenv.cli import main

    assert assign(MAC, "lamp", " mysql, php ", now=1.0).components == "mysql,php"
    state = tmp_path / "state"
    assert main(["assign", MAC, "lamp", "--components", "mysql, php", "--state", str(state)]) == 0
    machine = Store(state).get(MAC)
    assert machine is not None and machine.components == "mysql,php"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"mac": "52:54:00:12:34:56", "oops": 1}', "it has no 'image'"),
        ("[1, 2]", "it holds a JSON list, not an object"),
        ("{torn", "not JSON"),
        (
            json.dumps({**to_dict(fresh()), "mac": "52:54:00:00:00:01"}),
            "it is the record of 52:54:00:00:00:01",
        ),
        (json.dumps({**to_dict(fresh()), "assignment": "../x"}), "is not an assignment id"),
        (json.dumps({**to_dict(fresh()), "state": "gone"}), "'gone' is not a valid State"),
    ],
)
def test_a_damaged_record_is_one_error_naming_the_machine_and_its_file(
    tmp_path: Path, text: str, why: str
) -> None:
    store = Store(tmp_path)
    path = tmp_path / "machines" / "52-54-00-12-34-56.json"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        store.get(MAC)
    assert caught.value.message.startswith(f"the record of {MAC} is damaged: ")
    assert why in caught.value.message
    assert caught.value.hint == f"restore {path}, or remove it"
    assert store.all() == []  # and listed as damaged, not raised: see test_serve.py
    assert [type(e).__name__ for e in store.scan()] == ["Damaged"]


def test_only_the_run_of_the_current_assignment_moves_a_machine() -> None:
    machine, again = fresh(), fresh()
    assert machine.assignment and again.assignment and machine.assignment != again.assignment
    assert superseded(machine, machine.assignment) is None
    assert "assigned again" in (superseded(machine, again.assignment) or "")
    assert "names no assignment" in (superseded(machine, None) or "")  # an older agent's URL
    assert superseded(replace(machine, assignment=None), None) is None  # an older bootenv's record
    assert superseded(None, None) is None  # a machine nobody assigned: tracked
    assert "no record" in (superseded(None, machine.assignment) or "")


SIGNED = "https://cdn.example.com/images/lamp?sig=" + "A" * 1830  # a presigned URL


def test_an_assignment_whose_kernel_line_the_kernel_would_cut_is_refused() -> None:
    """x86 keeps 2047 bytes of the command line and drops the rest without a word: with a
    long presigned image URL the host name was gone. The line is counted as serve builds
    it, with serve's URL and a 16-digit assignment id."""
    from bootenv.menu import MAX_CMDLINE, BootSpec

    with pytest.raises(UserError, match=r"would be 2\d\d\d bytes, over the 2047 the kernel keeps") as exc:
        assign("52:54:00:12:34:56", SIGNED, "all", now=0.0, hostname="web01.rack4.example.com")
    assert "\n" not in exc.value.message
    base = "http://10.0.2.2:8080"
    room = MAX_CMDLINE - len(
        BootSpec(
            base, "52:54:00:12:34:56", f"{base}/images/lamp", "all", assignment="0" * 16
        ).kernel_cmdline()
    )
    fits = "x=" + "y" * (room - 3)  # the kernel arguments add a space and themselves
    machine = assign("52:54:00:12:34:56", "lamp", "all", now=0.0, kernel_args=fits, base_url=base)
    assert machine.kernel_args == fits
    with pytest.raises(UserError, match="over the 2047"):
        assign("52:54:00:12:34:56", "lamp", "all", now=0.0, kernel_args=fits + "y", base_url=base)
    # serve's URL counts: the same arguments with a longer one do not fit.
    with pytest.raises(UserError, match="over the 2047"):
        assign("52:54:00:12:34:56", "lamp", "all", now=0.0, kernel_args=fits, base_url=base + "/pxe")
