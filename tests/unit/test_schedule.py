"""The layout's scheduler: which piece a stream is given next, and what is fetched ahead
meanwhile."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

import pytest

from bootenv import schedule as schedule_mod
from bootenv import stream as stream_mod
from bootenv.extract import Stats
from bootenv.fetchahead import FetchAhead
from bootenv.manifest import Blob, Chunk, Component
from bootenv.schedule import ComponentResult, Scheduler
from tests.unit import test_layout_chunks as chunks
from tests.unit.httpfault import Fault, FaultServer
from tests.unit.test_layout_chunks import manifest

images = chunks.images  # the chunked image, a fixture: pytest finds it by this name


class _Held:
    """A stream pool whose jobs wait until the test runs them, one at a time."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self.first: Future[Any] | None = None
        self.submitted = threading.Event()  # the first job is in

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.jobs.put((fut, fn, args))
        if self.first is None:
            self.first = fut
            self.submitted.set()
        return fut

    def run_one(self) -> None:
        fut, fn, args = self.jobs.get(timeout=0.1)
        fut.set_result(fn(*args))


@contextlib.contextmanager
def _held_run(
    ahead: FetchAhead, root: Path, comp: Component
) -> Iterator[tuple[_Held, threading.Thread, list[list[ComponentResult]]]]:
    """A 2-stream scheduler laying out `comp` on a thread, its jobs held in a `_Held` pool;
    on exit, whatever is left runs to the end, and `ahead` is closed."""
    pool = _Held()
    sched = Scheduler(2, root, os.geteuid() == 0, ahead)
    results: list[list[ComponentResult]] = []
    runner = threading.Thread(target=lambda: results.append(sched.run(pool, [comp])), daemon=True)
    runner.start()
    try:
        yield pool, runner, results
    finally:
        deadline = time.monotonic() + 30
        while runner.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                pool.run_one()
            runner.join(timeout=0.01)
        ahead.close()


def test_later_chunks_are_fetched_while_the_first_piece_is_laid_out(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, chunked, _ = images
    waits: list[set[Future[Any]]] = []
    waited = threading.Condition()

    def counting_wait(fs: Any, **kw: Any) -> Any:
        with waited:
            waits.append(set(fs))
            waited.notify_all()
        return futures_wait(fs, **kw)

    monkeypatch.setattr(schedule_mod, "wait", counting_wait)
    comp = manifest(chunked).component("good")
    root = tmp_path / "root"
    root.mkdir()
    ahead = FetchAhead(str(chunked), 2, spill=tmp_path)
    with _held_run(ahead, root, comp) as (pool, _, results):
        # The first piece (the directories) is held. Having started the fetches ahead,
        # the scheduler waits on that job alone, which only the test ends: it starts no
        # other fetch meanwhile, and a chunk in for a piece that cannot start yet does not
        # wake it (that would spin until the first piece is done).
        assert pool.submitted.wait(30), "the first piece never started"
        job = pool.first
        with waited:
            assert waited.wait_for(lambda: any(job in w for w in waits), timeout=30), "no wait for the job"
        started = [i for i in range(1, len(comp.chunks)) if ahead.get((comp.name, i)) is not None]
        # The connections fetch the next chunks meanwhile, one per stream: the second per
        # stream is kept for pieces that can start.
        _, pending = futures_wait([ahead.get((comp.name, i)) for i in started], timeout=30)
        assert not pending, "a fetch hung"
        fetched, held = _fetched(ahead, comp), pool.jobs.qsize()
        assert len(fetched) == 2, f"fetched while the first piece was held: {fetched}"
        assert started == fetched and held == 1
        with waited:
            assert [w for w in waits if job in w] == [{job}], "it woke while the job was held"
    assert [r.status for r in results[0]] == ["done"]
    assert results[0][0].files > 0 and (root / "opt/good/sub").is_dir()


def test_each_stream_has_a_next_piece_waiting_in_the_pool(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    """Two streams are given three pieces at once: the third waits in the pool's queue,
    so a stream that ends a piece starts the next without waiting for the scheduler to
    hear of it. No more than that: the rest wait in the scheduler, in order of work."""
    _, chunked, _ = images
    comp = manifest(chunked).component("good")
    assert len(comp.chunks) > 4
    root = tmp_path / "root"
    root.mkdir()
    ahead = FetchAhead(str(chunked), 2, spill=tmp_path)
    with _held_run(ahead, root, comp) as (pool, _, results):
        pool.run_one()  # the first piece, its directories: the others may start now
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pool.jobs.qsize() < 3:
            time.sleep(0.01)
        time.sleep(0.2)  # a fourth job, if one were given, would be by now
        assert pool.jobs.qsize() == 3
        pool.run_one()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pool.jobs.qsize() < 3:
            time.sleep(0.01)
        time.sleep(0.2)
        assert pool.jobs.qsize() == 3  # one ended, one more was given
    assert [r.status for r in results[0]] == ["done"]
    assert (root / "opt/good/sub").is_dir()


def test_a_chunk_that_fails_its_fetch_fails_its_component_at_once(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    """Of the two chunks fetched while the directories are laid out, the second to start
    is corrupt: once the first piece is done, no other piece of the component is started
    (before, the first one was, and the others until the bad one's turn came)."""
    _, chunked, _ = images
    comp = manifest(chunked).component("good")
    good, bad = sorted(range(1, len(comp.chunks)), key=lambda i: -schedule_mod._work(comp.chunks[i]))[:2]
    k = comp.chunks[bad]
    root = tmp_path / "root"
    root.mkdir()
    with FaultServer(chunked) as srv:
        srv.faults[comp.data.file] = Fault(corrupt_at=k.offset + k.size // 2)
        ahead = FetchAhead(srv.url, 2, spill=tmp_path)
        with _held_run(ahead, root, comp) as (pool, runner, results):
            deadline = time.monotonic() + 10
            fetches = [ahead.get((comp.name, i)) for i in (good, bad)]
            while time.monotonic() < deadline and not all(f and f.done() for f in fetches):
                time.sleep(0.01)
                fetches = [ahead.get((comp.name, i)) for i in (good, bad)]
            assert [f.exception(timeout=10) is None for f in fetches if f] == [True, False], (
                "both in, one bad"
            )
            pool.run_one()  # the first piece
            runner.join(timeout=10)
            assert not runner.is_alive(), "the scheduler stopped: nothing more to start"
            assert pool.jobs.qsize() == 0, "no other piece of the failed component was started"
    [res] = results[0]
    assert res.status == "failed" and res.error and "sha256" in res.error


def test_pieces_of_a_component_that_failed_meanwhile_are_neither_queued_nor_fetched(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    """A chunk fetched ahead fails the component while its first piece is laid out: once
    that piece is done, its other pieces are not queued, and a piece queued before is
    not fetched ahead (another component's start would have fetched it, for nobody)."""
    _, chunked, _ = images
    comp = manifest(chunked).component("good")
    root = tmp_path / "root"
    root.mkdir()
    ahead = FetchAhead(str(chunked), 2, spill=tmp_path)
    try:
        sched = Scheduler(2, root, os.geteuid() == 0, ahead)
        sched.started[comp.name], sched.got[comp.name] = time.monotonic(), {}
        first: Future[Any] = Future()
        sched.jobs[first] = ("piece", comp, 0)
        sched.push(-1, "piece", comp, 1)  # queued before the failure
        sched.fail(comp.name, "good: sub-image does not match its sha256")
        sched.push(-1, "piece", comp, 2)  # however one gets there, it is not fetched
        first.set_result(stream_mod.Piece(comp.name, 0, Stats()))
        sched.finished(first)
        assert [(c.name, kind) for _, _, kind, c, _, _ in sched.ready] == [("good", "piece")]
        assert sched.ready_pieces() == []
        sched.fetch_ahead()
        assert all(ahead.get((comp.name, i)) is None for i in range(len(comp.chunks)))
    finally:
        ahead.close()
    assert sched.results[comp.name].status == "failed"


def test_pieces_start_in_order_of_the_work_they_are_not_of_their_download(tmp_path: Path) -> None:
    """A chunk of zeros (a database's preallocated log) comes in small and writes much:
    ordered by compressed size it started last and held up the run's end. The order is
    by bytes fetched plus bytes written, both for the streams and for fetching ahead."""
    chunks = (
        Chunk(0, 100, 1_000, "0" * 64),  # the first piece: the directories
        Chunk(100, 5_000, 20_000, "1" * 64),  # work 25 000
        Chunk(5_100, 300, 90_000, "2" * 64),  # zeros: work 90 300, the smallest download
        Chunk(5_400, 9_000, 12_000, "3" * 64),  # work 21 000
        Chunk(14_400, 16_000, 11_000, "4" * 64),  # the largest download, work 27 000
    )
    # By compressed size alone: 4, 3, 1, 2; by bytes written alone: 2, 1, 3, 4.
    comp = Component("db", Blob("d.tar.zst", "0" * 64, 30_400, 134_000), (), (), 9, (), chunks)
    ahead = FetchAhead(str(tmp_path), 2, spill=tmp_path)
    try:
        sched = Scheduler(2, tmp_path, False, ahead)
        sched.started[comp.name], sched.got[comp.name] = time.monotonic(), {}
        first: Future[Any] = Future()
        sched.jobs[first] = ("piece", comp, 0)
        sched.later[comp.name] = comp
        # Fetched ahead by work; the memory each takes is still its download's size.
        assert _later_order(sched) == [(2, 300), (4, 16_000), (1, 5_000), (3, 9_000)]
        first.set_result(stream_mod.Piece(comp.name, 0, Stats()))
        sched.finished(first)
        assert [i for _, i in sched.ready_pieces()] == [2, 4, 1, 3]
    finally:
        ahead.close()


def _later_order(sched: Scheduler) -> list[tuple[int, int]]:
    """(piece, bytes of memory asked for) of what fetch_ahead() starts, in order, while
    a component's first piece is laid out (with room for every piece)."""
    asked: list[int] = []
    started: list[tuple[int, int]] = []

    class Recorder:
        def get(self, key: tuple[str, int]) -> None:
            return None

        def room(self, size: int, *, second: bool = True) -> bool:
            asked.append(size)
            return True

        def start(self, comp: Component, index: int) -> None:
            started.append((index, asked[-1]))

    real, sched.ahead = sched.ahead, Recorder()  # type: ignore[assignment]
    try:
        sched.fetch_ahead()
    finally:
        sched.ahead = real
    return started


class _Draining(FetchAhead):
    """Fetches whose component failed are still downloading, and hold every slot until
    `gate` is set (as when a component fails while its big chunks download)."""

    def __init__(self, image: str, width: int, spill: Path) -> None:
        super().__init__(image, width, spill)
        self.gate: Future[None] = Future()

    def room(self, size: int, *, second: bool = True) -> bool:
        return self.gate.done() and super().room(size, second=second)

    def draining(self) -> list[Future[Any]]:
        return [] if self.gate.done() else [self.gate]


def test_slots_held_by_released_fetches_are_waited_for(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    """No job runs, the ready pieces have no fetch, and released fetches still hold the
    slots: the scheduler waits for one to stop (it used to find nothing to wait on, and
    fail an assertion), then fetches and lays out the component."""
    _, chunked, _ = images
    comp = manifest(chunked).component("good")
    root = tmp_path / "root"
    root.mkdir()
    ahead = _Draining(str(chunked), 2, spill=tmp_path)
    timer = threading.Timer(0.3, ahead.gate.set_result, (None,))
    timer.start()
    try:
        [res] = Scheduler(2, root, os.geteuid() == 0, ahead).run(schedule_mod.Inline(), [comp])
    finally:
        timer.cancel()
        ahead.close()
    assert ahead.gate.done() and res.status == "done"
    assert (root / "opt/good/sub").is_dir()


def _fetched(ahead: FetchAhead, comp: Component) -> list[int]:
    """The chunks of `comp` that are in (fetched and verified) and not handed to a stream."""
    got = []
    for i in range(len(comp.chunks)):
        f = ahead.get((comp.name, i))
        if f is not None and f.done() and f.exception() is None and i != 0:
            got.append(i)
    return got
