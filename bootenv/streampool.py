"""Run a layout's streams: each a process, forked before any thread of the layout's
process runs, or, for one stream, the layout's process itself. The scheduler
(schedule.py) gives them their pieces; their progress events come back through a queue
and are summed per component on the way to the callback.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bootenv import stream
from bootenv.atfd import reserve_fd_table
from bootenv.callback import Callback, Event
from bootenv.fetchahead import FetchAhead
from bootenv.manifest import Component
from bootenv.schedule import ComponentResult, Inline, Scheduler

MAX_STREAMS = 4


def default_streams(n: int) -> int:
    return max(1, min(n, MAX_STREAMS))


def run_streams(
    image: str, comps: list[Component], root: Path, streams: int, poster: Callback, began: float
) -> list[ComponentResult]:
    """Lay out every piece of every component on `streams` processes.

    A component's first piece (its directories) goes first; its other pieces then join
    the queue, so a large component is spread over all the streams. When a component's
    pieces are all in, one more job restores its directory mtimes, syncs the filesystem
    and records it in the journal.
    """
    pieces = sum(len(c.pieces()) for c in comps)
    streams = streams or default_streams(pieces)
    privileged = os.geteuid() == 0
    progress = _ProgressSum(poster.send)
    width = 1 if streams <= 1 or pieces <= 1 else min(streams, pieces)  # no idle processes
    reserve_fd_table()  # before the fetch threads start
    # The fetches stop only once the streams are done (the pool below has shut down):
    # a stream may still be reading a chunk the parent holds.
    ahead = FetchAhead(image, width, spill=root)
    try:
        if width == 1:
            poster.start()
            stream.SINK[:] = [progress]
            try:
                return Scheduler(1, root, privileged, ahead, began).run(Inline(), comps)
            finally:
                stream.SINK.clear()
        return _run_pool(Scheduler(width, root, privileged, ahead, began), comps, progress, poster.start)
    finally:
        ahead.close()


def _run_pool(
    sched: Scheduler, comps: list[Component], progress: _ProgressSum, forked: Callable[[], None]
) -> list[ComponentResult]:
    """Run `sched` on `sched.width` stream processes (forked before any thread of this
    process runs); call `forked` once they are."""
    ctx = get_context("fork")
    events: Any = ctx.Queue()
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(events, progress, stop), daemon=True)
    try:
        with ProcessPoolExecutor(
            sched.width, mp_context=ctx, initializer=stream.init_worker, initargs=(events,)
        ) as pool:
            # Fork every stream now, before any thread of this process runs (the pump,
            # the callback's poster, the fetches, the flusher): a fork copies no thread,
            # only the locks they hold.
            # Frozen first: the streams' garbage collector then never walks (and so never
            # writes to, and copies) the objects they share with this process. Measured on
            # a layout of 4 GB on 2 streams: 138 MiB at its peak (every process's PSS
            # and the chunks in memfds) without, 124 MiB with.
            gc.freeze()
            pool.submit(os.getpid).result()
            forked()
            pump.start()
            try:
                return sched.run(pool, comps)
            except BaseException:
                # Leaving the pool waits for the streams' pieces: one read as it arrives
                # would wait for its download, which is stopped first.
                sched.ahead.stop()
                raise
    finally:
        gc.unfreeze()  # the streams are gone: what was frozen is collectable again
        # The streams have exited, their events are all in the queue: this one comes last.
        events.cancel_join_thread()  # exiting never waits to send it
        events.put(None)
        stop.set()
        if pump.ident is not None:
            pump.join()
        # Its feeder thread then ends once it has written what is queued, so a layout
        # tried again forks with no thread of it. Not always: a stream killed while it
        # held the queue's write lock leaves the feeder blocked for good. That thread
        # holds no lock of Python's, so a fork beside it is safe all the same.
        events.close()


class _ProgressSum:
    """Turn per-piece progress into per-component totals before they are posted."""

    def __init__(self, send: Callable[[Event], None]) -> None:
        self.send = send
        self.pieces: dict[tuple[str, int], tuple[int, int]] = {}

    def __call__(self, event: Event) -> None:
        if event.get("event") == "progress" and "piece" in event:
            name = event["component"]
            self.pieces[(name, event.pop("piece"))] = (event["files"], event["bytes"])
            mine = [v for (n, _), v in self.pieces.items() if n == name]
            event = {**event, "files": sum(f for f, _ in mine), "bytes": sum(b for _, b in mine)}
        self.send(event)


def _pump(events: Any, sink: Callable[[Event], None], stop: threading.Event) -> None:
    """Hand the streams' events to `sink` until the None that comes after the last; or,
    once `stop` is set, when none has come for a while (a stream killed while it held
    the queue's lock would keep the None from ever coming)."""
    while True:
        try:
            event = events.get(timeout=0.5)
        except queue.Empty:
            if stop.is_set():
                return
            continue
        if event is None:
            return
        sink(event)
