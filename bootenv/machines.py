"""The provisioning state of one machine: a pure state machine driven by callback events.

    assigned -> provisioning -> os_written -> os_booted -> components_laid_out -> done
                      \\______________\\____________\\_______________\\___________> failed

A machine moves only forward. An event may skip states (a lost callback must not wedge
a machine), but an event that would move it backwards, or out of `done`/`failed`, is an
*invalid transition*: it is recorded on the machine and in the events log, and the state
does not change. Nothing here raises on a well-formed event; only malformed input raises
(`EventError`), and the server answers that with 400.

The event format that the agent and the layout service post is documented in
docs/SERVE.md ("Callback events").
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from bootenv import ipxetext
from bootenv.errors import UserError

_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ASSIGNMENT = re.compile(r"^[0-9a-f]{16}$")
MAX_TEXT = 4096  # characters of one message, path or step name
MAX_DEPTH = 32  # levels of lists and objects in an event's data


class EventError(UserError):
    """A callback event is malformed."""


class RecordError(UserError):
    """A stored machine record does not hold a machine (edited by hand, or damaged)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"machine record is damaged: {reason}")
        self.reason = reason


class State(StrEnum):
    ASSIGNED = "assigned"
    PROVISIONING = "provisioning"
    OS_WRITTEN = "os_written"
    OS_BOOTED = "os_booted"
    COMPONENTS_LAID_OUT = "components_laid_out"
    DONE = "done"
    FAILED = "failed"


ORDER = (
    State.ASSIGNED,
    State.PROVISIONING,
    State.OS_WRITTEN,
    State.OS_BOOTED,
    State.COMPONENTS_LAID_OUT,
    State.DONE,
)
FINAL = (State.DONE, State.FAILED)
# States in which the OS is on the disk: the machine boots from it, never reinstalls.
INSTALLED = (State.OS_WRITTEN, State.OS_BOOTED, State.COMPONENTS_LAID_OUT, State.DONE)


class Kind(StrEnum):
    """What an event says. Milestone kinds move the state; the others are the timeline."""

    START = "start"  # the agent (-> provisioning) or the layout service (-> os_booted) is up
    STEP = "step"  # a named step started, finished or failed (with its timing)
    PROGRESS = "progress"  # bytes or files done of a step
    CONFLICT = "conflict"  # the layout kept both versions of a path
    OS_WRITTEN = "os_written"  # the OS sub-image is on the disk and verified
    OS_BOOTED = "os_booted"  # the target OS is running (the layout service started)
    COMPONENTS_LAID_OUT = "components_laid_out"
    DONE = "done"  # everything finished
    ERROR = "error"  # fatal unless "fatal": false -> failed


MILESTONES: dict[Kind, State] = {
    Kind.OS_WRITTEN: State.OS_WRITTEN,
    Kind.OS_BOOTED: State.OS_BOOTED,
    Kind.COMPONENTS_LAID_OUT: State.COMPONENTS_LAID_OUT,
    Kind.DONE: State.DONE,
}
# A finished step with one of these names implies the milestone, so a sender that only
# reports steps still drives the state.
STEP_MILESTONES: dict[str, State] = {
    "write-os": State.OS_WRITTEN,
    "layout": State.COMPONENTS_LAID_OUT,
}


class StepStatus(StrEnum):
    START = "start"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Event:
    kind: Kind
    source: str = "agent"  # "agent" or "layout"
    step: str | None = None
    status: StepStatus | None = None
    component: str | None = None
    elapsed: float | None = None  # seconds the step took, by the sender's clock
    bytes: int | None = None
    total: int | None = None
    files: int | None = None
    path: str | None = None
    message: str | None = None
    fatal: bool = True
    seq: int | None = None
    data: Mapping[str, Any] | None = None  # free-form extras, stored as sent


@dataclass(frozen=True)
class Mark:
    """One entry of a machine's timeline: it entered `state` at `at` (epoch seconds)."""

    state: State
    at: float


@dataclass(frozen=True)
class Machine:
    mac: str
    image: str  # an image name under the images dir, or an http(s) URL
    components: str  # "all", "none" or "a,b"
    state: State
    timeline: tuple[Mark, ...]
    hostname: str | None = None
    entry: str | None = None  # the catalog entry chosen from the menu, if any
    kernel_args: str = ""  # extra kernel arguments for the ramdisk
    error: str | None = None
    conflicts: int = 0
    invalid: int = 0  # events that asked for a transition the machine can't make
    events: int = 0
    updated: float = 0.0
    # Names this assignment in the callback URL its ramdisk gets, so that the events of a
    # run an assignment replaced are told apart (`superseded`). None: a record an older
    # bootenv wrote, or one a callback made (nobody assigned the machine).
    assignment: str | None = None

    @property
    def started(self) -> float:
        return self.timeline[0].at if self.timeline else self.updated

    def reached(self, state: State) -> float | None:
        for mark in self.timeline:
            if mark.state is state:
                return mark.at
        return None


@dataclass(frozen=True)
class Outcome:
    machine: Machine
    changed: bool  # the state moved
    invalid: str | None = None  # why a requested transition was refused
    repeated: bool = False  # an event already taken (an attempt made again): nothing changed


def normalize_mac(text: str) -> str:
    """`52-54-00-AB-CD-EF`, `525400abcdef` and `52:54:00:ab:cd:ef` -> the last form."""
    mac = text.strip().lower()
    if not _MAC.fullmatch(mac):
        raise UserError(f"{text!r} is not a MAC address", hint="write it as 52:54:00:12:34:56")
    digits = mac.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def check_image(image: str) -> str:
    if image.startswith(("http://", "https://")):
        why = ipxetext.url_problem(image)
        if why is not None:
            raise UserError(f"image URL {image!r} {why}: it goes into an iPXE script")
        return image
    if not _IMAGE.fullmatch(image) or ".." in image:
        raise UserError(f"{image!r} is not an image name (a directory under --images) or an http(s) URL")
    return image


def check_components(text: str) -> str:
    """`all`, `none` or comma-separated component names, normalised."""
    if text in ("all", "none"):
        return text
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if not _NAME.fullmatch(name) or name in ("os", "all", "none"):
            raise UserError(f"{name!r} is not a component name", hint="use a,b or all or none")
    if len(set(names)) != len(names):
        raise UserError("a component is named twice")
    return ",".join(names)


def check_script_values(hostname: str | None, kernel_args: str) -> None:
    """The host name (one argument's value: a space would add arguments of its own) and
    the kernel arguments (printable ASCII that iPXE takes as it is) can go into an iPXE
    script and the kernel's command line; UserError if not."""
    from bootenv.cmdline import check_hostname, shown

    if hostname:
        check_hostname(hostname)
    why = ipxetext.problem(kernel_args)
    if why is None and not (kernel_args.isascii() and kernel_args.isprintable()):
        why = "holds a character that is not printable ASCII"
    if why is not None:
        raise UserError(f"the kernel arguments {shown(kernel_args)} {why}: they go into an iPXE script")


def check_boot_args(image: str, components: str, hostname: str | None, kernel_args: str) -> None:
    """Read the ramdisk's bootenv.* arguments as its agent will (bootenv/menu.py builds
    them): a key it would refuse (unknown, given twice, a bad value) is refused now,
    not when the machine boots. An image by name stands for a URL of the server's.
    Both values go into an iPXE script and the kernel's command line: the host name is
    one argument's value (a space would add arguments of its own), and the kernel
    arguments are printable ASCII that iPXE takes as it is."""
    from bootenv.cmdline import parse_cmdline
    from bootenv.handoff import passed_on_problem

    check_script_values(hostname, kernel_args)
    url = image if image.startswith(("http://", "https://")) else "http://server/image"
    args = [f"bootenv.image={url}", f"bootenv.components={components}"]
    args += ["bootenv.callback=http://server/callback"]
    if hostname:
        args.append(f"bootenv.hostname={hostname}")
    parse_cmdline(" ".join([*args, kernel_args]))
    why = passed_on_problem(kernel_args)  # what the agent passes on to grub.cfg and kexec
    if why is not None:
        raise UserError(why)


def assign(
    mac: str,
    image: str,
    components: str,
    *,
    now: float,
    hostname: str | None = None,
    entry: str | None = None,
    kernel_args: str = "",
) -> Machine:
    """A fresh assignment: the machine will be provisioned on its next network boot.
    It gets a new id (`Machine.assignment`), so the events of a run it replaces, which
    name the assignment before, are refused."""
    image = check_image(image)
    components = check_components(components)  # "a, b" is "a,b", as in the catalog
    check_boot_args(image, components, hostname, kernel_args)
    return Machine(
        mac=normalize_mac(mac),
        image=image,
        components=components,
        state=State.ASSIGNED,
        timeline=(Mark(State.ASSIGNED, now),),
        hostname=hostname,
        entry=entry,
        kernel_args=kernel_args,
        updated=now,
        assignment=secrets.token_hex(8),
    )


def check_assignment(text: str) -> str:
    """An assignment id as a callback URL carries it (16 hex digits)."""
    if not _ASSIGNMENT.fullmatch(text):
        raise UserError(f"{text[:40]!r} is not an assignment id (16 hex digits)")
    return text


def superseded(machine: Machine | None, assignment: str | None) -> str | None:
    """Why an event posted for `assignment` (None: a URL that names none) must not touch
    this record: it comes from a run of another assignment. None if it may.

    A URL without an id (an agent run by hand, or one started by an older bootenv) is
    heard for a record that has none either: one made by its callbacks, or one an older
    bootenv assigned. Once an admin or the menu assigns the machine, only its own
    run's events are."""
    if assignment is None:
        if machine is None or machine.assignment is None:
            return None
        return (
            f"{machine.mac} is assigned, and this callback URL names no assignment: "
            "events of a run started before it are not taken"
        )
    if machine is None:
        return f"no assignment {assignment}: the machine has no record (removed since?)"
    if machine.assignment != assignment:
        return (
            f"{machine.mac} was assigned again since assignment {assignment}: its run's events are not taken"
        )
    return None


def target_state(event: Event) -> State | None:
    """The state an event asks for, if it is a milestone."""
    if event.kind is Kind.ERROR:
        return State.FAILED if event.fatal else None
    if event.kind is Kind.STEP and event.step is not None:
        if event.status is StepStatus.FAILED and event.fatal:
            return State.FAILED
        if event.status is StepStatus.DONE and event.step in STEP_MILESTONES:
            return STEP_MILESTONES[event.step]
        return _activity(event)
    if event.kind in (Kind.START, Kind.PROGRESS, Kind.CONFLICT):
        return _activity(event)
    return MILESTONES.get(event.kind)


def _activity(event: Event) -> State:
    """The state that activity implies: the agent runs in the ramdisk, layout in the OS."""
    return State.PROVISIONING if event.source == "agent" else State.OS_BOOTED


def _is_chatter(event: Event) -> bool:
    """Activity that only implies a state; it never counts as an invalid transition."""
    if event.kind in (Kind.START, Kind.PROGRESS, Kind.CONFLICT):
        return True
    return event.kind is Kind.STEP and event.status is StepStatus.START


def apply(machine: Machine, event: Event, *, now: float) -> Outcome:
    """The machine after `event`. Never raises: refused transitions are recorded."""
    m = replace(
        machine,
        events=machine.events + 1,
        updated=now,
        conflicts=machine.conflicts + (1 if event.kind is Kind.CONFLICT else 0),
    )
    target = target_state(event)
    if target is None or target is m.state:
        return Outcome(m, changed=False)
    why = _refusal(m.state, target)
    if why is not None:
        # Activity that merely implies an earlier state is normal chatter (the agent's
        # kexec step after os_written); only a milestone or a failure that can't be
        # applied counts as invalid.
        if _is_chatter(event) or (
            event.kind is Kind.STEP and target is not State.FAILED and event.step not in STEP_MILESTONES
        ):
            return Outcome(m, changed=False)
        return Outcome(replace(m, invalid=m.invalid + 1), changed=False, invalid=why)
    error = m.error
    if target is State.FAILED:
        error = event.message or (f"step {event.step} failed" if event.step else "failed")
    return Outcome(
        replace(m, state=target, timeline=(*m.timeline, Mark(target, now)), error=error),
        changed=True,
    )


def _refusal(current: State, target: State) -> str | None:
    if current in FINAL:
        return f"{current.value} is final; cannot go to {target.value} (re-assign the machine)"
    if target is State.FAILED:
        return None
    if ORDER.index(target) < ORDER.index(current):
        return f"cannot go back from {current.value} to {target.value}"
    return None


def parse_event(doc: object) -> Event:
    """Validate a decoded JSON callback body; anything wrong is one EventError line."""
    if not isinstance(doc, dict):
        raise EventError("an event must be a JSON object")
    unknown = set(doc) - _FIELDS.keys() - {"event", "time"}
    if unknown:
        raise EventError(f"unknown key {sorted(unknown)[0]!r} in event", hint="put extras under 'data'")
    try:
        kind = Kind(str(doc.get("event")))
    except ValueError:
        raise EventError(
            f"unknown event {doc.get('event')!r}", hint=f"one of {', '.join(k.value for k in Kind)}"
        ) from None
    if doc.get("time") is not None:
        _field("time", doc["time"], float)  # the sender's clock: it names the event with seq
    values: dict[str, Any] = {}
    for key, typ in _FIELDS.items():
        if key not in doc or doc[key] is None:
            continue
        values[key] = _field(key, doc[key], typ)
    if "source" in values and values["source"] not in ("agent", "layout"):
        raise EventError("event source must be 'agent' or 'layout'")
    if "status" in values:
        try:
            values["status"] = StepStatus(values["status"])
        except ValueError:
            raise EventError("step status must be start, done or failed") from None
    if kind is Kind.STEP and ("step" not in values or "status" not in values):
        raise EventError("a step event needs 'step' and 'status'")
    if "component" in values and not _NAME.fullmatch(values["component"]):
        raise EventError(f"{values['component']!r} is not a component name")
    return Event(kind=kind, **values)


_FIELDS: dict[str, type] = {
    "source": str,
    "step": str,
    "status": str,
    "component": str,
    "elapsed": float,
    "bytes": int,
    "total": int,
    "files": int,
    "path": str,
    "message": str,
    "fatal": bool,
    "seq": int,  # the sender's sequence number: with "time", it names the event (state.py)
    "data": dict,
}


def finite(value: object) -> float | None:
    """A JSON number as a float, or None: not a number, NaN, infinite, or an integer too
    big for a float (JSON has no bound on them)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _field(key: str, value: object, typ: type) -> object:
    if typ is float:
        number = finite(value)
        if number is None or number < 0:
            raise EventError(f"event {key} must be a non-negative number")
        return number
    if typ is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise EventError(f"event {key} must be a non-negative integer")
        return value
    if not isinstance(value, typ):
        raise EventError(f"event {key} must be {'an object' if typ is dict else typ.__name__}")
    if isinstance(value, str) and (len(value) > MAX_TEXT or "\x00" in value):
        raise EventError(f"event {key} is too long or holds a NUL")
    if isinstance(value, dict) and _depth(value) > MAX_DEPTH:
        # Stored, it would break every later read of the machine's events: the JSON
        # encoder the API answers with recurses, and runs out of stack.
        raise EventError(f"event {key} is nested more than {MAX_DEPTH} levels deep")
    return value


def _depth(value: object) -> int:
    """How deeply lists and objects nest in a decoded JSON value (a scalar is 0). A loop,
    not recursion: the value may be as deep as the JSON parser allowed."""
    deepest, level = 0, [(value, 1)]
    while level:
        node, depth = level.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        level.extend((child, depth + 1) for child in children)
    return deepest


def to_dict(machine: Machine) -> dict[str, Any]:
    """The JSON form stored on disk and printed by `bootenv machines --json`."""
    return {
        "mac": machine.mac,
        "image": machine.image,
        "components": machine.components,
        "state": machine.state.value,
        "timeline": [{"state": m.state.value, "at": m.at} for m in machine.timeline],
        "hostname": machine.hostname,
        "entry": machine.entry,
        "kernel_args": machine.kernel_args,
        "error": machine.error,
        "conflicts": machine.conflicts,
        "invalid": machine.invalid,
        "events": machine.events,
        "updated": machine.updated,
        "assignment": machine.assignment,
    }


def from_dict(doc: Mapping[str, Any]) -> Machine:
    """A machine from its record, which is held to what `assign` checks: a record edited
    by hand (or by an older bootenv) whose host name or kernel arguments cannot go into
    its iPXE script is damaged (RecordError), not a crash of the request that reads it."""
    if not isinstance(doc, Mapping):
        raise RecordError(f"it holds a JSON {type(doc).__name__}, not an object")
    try:
        machine = Machine(
            mac=normalize_mac(doc["mac"]),
            image=str(doc["image"]),
            components=str(doc["components"]),
            state=State(doc["state"]),
            timeline=tuple(Mark(State(m["state"]), float(m["at"])) for m in doc["timeline"]),
            hostname=doc.get("hostname"),
            entry=doc.get("entry"),
            kernel_args=str(doc.get("kernel_args", "")),
            error=doc.get("error"),
            conflicts=int(doc.get("conflicts", 0)),
            invalid=int(doc.get("invalid", 0)),
            events=int(doc.get("events", 0)),
            updated=float(doc.get("updated", 0.0)),
            assignment=doc.get("assignment"),
        )
        if machine.hostname is not None and not isinstance(machine.hostname, str):
            raise TypeError(f"hostname {machine.hostname!r} is not a string")
        if machine.assignment is not None:
            if not isinstance(machine.assignment, str):
                raise TypeError(f"assignment {machine.assignment!r} is not a string")
            check_assignment(machine.assignment)
        check_script_values(machine.hostname, machine.kernel_args)
    except KeyError as exc:
        raise RecordError(f"it has no {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise RecordError(str(exc)) from exc
    except UserError as exc:
        raise RecordError(exc.message) from exc
    return machine
