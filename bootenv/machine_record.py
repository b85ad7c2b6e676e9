"""A machine's stored record: the JSON form `bootenv serve` keeps on disk and
`bootenv machines --json` prints (`to_dict`), and reading it back (`from_dict`), which
holds it to what `machines.assign` checks: a record that does not hold a machine is
damaged (`RecordError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bootenv.errors import UserError
from bootenv.machines import Machine, Mark, State, check_assignment, check_script_values, normalize_mac


class RecordError(UserError):
    """A stored machine record does not hold a machine (edited by hand, or damaged)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"machine record is damaged: {reason}")
        self.reason = reason


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
