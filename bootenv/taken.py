"""Which events the store has taken already: the last names of each sender.

An event that names itself (its sender's "seq" and "time") and was already taken is not
taken again (state.py). A sender has one event in flight at a time, so only the last
REMEMBERED names of each sender (machine and source) are kept, for the SENDERS heard from
last; the store reads a sender's last names back from its log when it does not know it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Any

from bootenv.event_schema import Event

REMEMBERED = 16  # event names per sender: it has one in flight, tried for seconds
SENDERS = 8192  # senders whose names are kept; the one heard from longest ago goes first
Name = tuple[int, float]  # seq, time


def event_name(event: Event, raw: dict[str, Any]) -> Name | None:
    """What names an event across its sender's attempts: its number, and the time it was
    made (a sender started again numbers from 1 again, at another time). `parse_event`
    has checked that the time is a finite number."""
    when = raw.get("time")
    if event.seq is None or when is None:
        return None
    return (event.seq, float(when))


class Taken:
    """The names of the last events taken from each sender (machine, source)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: OrderedDict[tuple[str, str], deque[Name]] = OrderedDict()

    def knows(self, sender: tuple[str, str]) -> bool:
        with self._lock:
            return sender in self._names

    def has(self, sender: tuple[str, str], name: Name) -> bool:
        with self._lock:
            return name in self._names.get(sender, ())

    def add(self, sender: tuple[str, str], name: Name) -> None:
        self._keep(sender, [name])

    def recall(self, sender: tuple[str, str], names: list[Name]) -> None:
        """Know these names of a sender (read back from its log), oldest first."""
        self._keep(sender, names)

    def _keep(self, sender: tuple[str, str], new: list[Name]) -> None:
        with self._lock:
            names = self._names.pop(sender, None)
            if names is None:
                names = deque(maxlen=REMEMBERED)
            names.extend(new)
            self._names[sender] = names  # the last heard from, last
            while len(self._names) > SENDERS:
                self._names.popitem(last=False)
