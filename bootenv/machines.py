"""The provisioning state of one machine: a pure state machine driven by callback events.

    assigned -> provisioning -> os_written -> os_booted -> components_laid_out -> done
                      \\______________\\____________\\_______________\\___________> failed

os_written means the disk boots: the agent says so once the OS is written, the target
configured, its boot loaders installed and all synced, just before it hands off. From
then on serve answers the machine's network boots with its local disk (`INSTALLED`);
a machine cut off before (a power cut, a reset) is still provisioning, and is
provisioned again.

A machine moves only forward. An event may skip states (a lost callback must not wedge
a machine), but an event that would move it backwards, or out of `done`/`failed`, is an
*invalid transition*: it is recorded on the machine and in the events log, and the state
does not change. Nothing here raises on an event: malformed input was refused when it
was parsed (bootenv/event_schema.py: `EventError`, which the server answers with 400).

A machine is assigned here (`assign`, which checks what goes into its iPXE script), and
an event of a run that another assignment replaced is told apart (`superseded`). Its
stored JSON form is bootenv/machine_record.py's.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from enum import StrEnum

from bootenv import ipxetext
from bootenv.errors import UserError
from bootenv.event_schema import NAME, Event, Kind, StepStatus

_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ASSIGNMENT = re.compile(r"^[0-9a-f]{16}$")


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
# States in which the disk boots: the machine boots from it, never reinstalls.
INSTALLED = (State.OS_WRITTEN, State.OS_BOOTED, State.COMPONENTS_LAID_OUT, State.DONE)

MILESTONES: dict[Kind, State] = {
    Kind.OS_WRITTEN: State.OS_WRITTEN,
    Kind.OS_BOOTED: State.OS_BOOTED,
    Kind.COMPONENTS_LAID_OUT: State.COMPONENTS_LAID_OUT,
    Kind.DONE: State.DONE,
}
# A finished step with one of these names implies the milestone, so a sender that only
# reports steps still drives the state. Not the agent's write-os: its disk cannot boot
# until the steps after it are done (os_written comes after them, below).
STEP_MILESTONES: dict[str, State] = {
    "layout": State.COMPONENTS_LAID_OUT,
}
# The agent's hand-off starts once the disk boots (boot loaders in, synced), as its
# os_written event is posted: it stands for that event, which an agent older than it
# does not send.
HANDOFF = "handoff"


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
        if not NAME.fullmatch(name) or name in ("os", "all", "none"):
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


def check_boot_args(
    image: str, components: str, hostname: str | None, kernel_args: str, *, base_url: str | None = None
) -> None:
    """Read the ramdisk's bootenv.* arguments as its agent will (bootenv/menu.py builds
    them): a key it would refuse (unknown, given twice, a bad value) is refused now,
    not when the machine boots. An image by name stands for a URL of the server's.
    Both values go into an iPXE script and the kernel's command line: the host name is
    one argument's value (a space would add arguments of its own), and the kernel
    arguments are printable ASCII that iPXE takes as it is.

    The whole command line must fit in what the kernel keeps (menu.MAX_CMDLINE): it is
    built as serve builds it, with `base_url`, serve's URL (when not known, as for
    `bootenv assign`, a short stand-in: serve's script refuses the rest), and an
    assignment id, which is always 16 hex digits."""
    from bootenv.cmdline import parse_cmdline
    from bootenv.handoff import passed_on_problem
    from bootenv.menu import BootSpec, cmdline_problem

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
    base = base_url or "http://server"
    url = image if image.startswith(("http://", "https://")) else f"{base}/images/{image}"
    spec = BootSpec(base, "00:00:00:00:00:00", url, components, hostname, kernel_args, assignment="0" * 16)
    why = cmdline_problem(spec)
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
    base_url: str | None = None,
) -> Machine:
    """A fresh assignment: the machine will be provisioned on its next network boot.
    It gets a new id (`Machine.assignment`), so the events of a run it replaces, which
    name the assignment before, are refused."""
    image = check_image(image)
    components = check_components(components)  # "a, b" is "a,b", as in the catalog
    check_boot_args(image, components, hostname, kernel_args, base_url=base_url)
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
        if event.status is StepStatus.START and event.step == HANDOFF and event.source == "agent":
            return State.OS_WRITTEN
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
        # hand-off after its os_written, a late agent event once the OS booted); only a
        # milestone or a failure that can't be applied counts as invalid.
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
