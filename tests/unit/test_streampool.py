"""The layout's streams' events on their way to the callback."""

from __future__ import annotations

import queue
import threading

from bootenv.streampool import _pump


def test_the_event_pump_hands_on_every_event_then_ends_at_the_sentinel() -> None:
    events: queue.Queue[dict[str, int] | None] = queue.Queue()
    for item in ({"n": 0}, {"n": 1}, None, {"n": 99}):
        events.put(item)
    got: list[dict[str, int]] = []
    _pump(events, got.append, threading.Event())
    assert got == [{"n": 0}, {"n": 1}]


def test_the_event_pump_ends_once_stopped_though_the_sentinel_never_comes() -> None:
    """A stream killed while it held the queue's lock keeps the parent's None from being
    sent: the layout must still end."""
    events: queue.Queue[dict[str, int] | None] = queue.Queue()
    events.put({"n": 1})
    stop = threading.Event()
    got: list[dict[str, int]] = []
    pump = threading.Thread(target=_pump, args=(events, got.append, stop))
    pump.start()
    stop.set()
    pump.join(5)
    assert not pump.is_alive()
    assert got == [{"n": 1}]
