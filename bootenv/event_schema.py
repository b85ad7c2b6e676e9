"""Callback events: the schema the agent and the layout service post to `bootenv serve`,
and its parsing (`parse_event`), which holds a decoded JSON body to it: anything
malformed is one `EventError` line, which the server answers with 400.

The event format is documented in docs/SERVE.md ("Callback events"); what an event
does to a machine's state is bootenv/machines.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bootenv.errors import UserError

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a component's name
MAX_TEXT = 4096  # characters of one message, path or step name
MAX_DEPTH = 32  # levels of lists and objects in an event's data


class EventError(UserError):
    """A callback event is malformed."""


class Kind(StrEnum):
    """What an event says. Milestone kinds move the state; the others are the timeline."""

    START = "start"  # the agent (-> provisioning) or the layout service (-> os_booted) is up
    STEP = "step"  # a named step started, finished or failed (with its timing)
    PROGRESS = "progress"  # bytes or files done of a step
    CONFLICT = "conflict"  # the layout kept both versions of a path
    OS_WRITTEN = "os_written"  # the disk boots: OS written and verified, boot loaders in, synced
    OS_BOOTED = "os_booted"  # the target OS is running (the layout service started)
    COMPONENTS_LAID_OUT = "components_laid_out"
    DONE = "done"  # everything finished
    ERROR = "error"  # fatal unless "fatal": false -> failed


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
    if "component" in values and not NAME.fullmatch(values["component"]):
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
