"""Schedule a layout's pieces over its streams (streampool.py runs the streams).

A stream lays out one piece of a component at a time (stream.py): a chunk, or the whole
blob when it has none. The scheduler starts the ready piece with the most work first,
once it is fetched and verified (fetchahead.py): a stream is only ever given bytes that
matched the manifest. When a component's pieces are all in, one more job restores its
directories' mtimes and makes it durable, and the scheduler records it in the journal.
It returns each component's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bootenv import stream
from bootenv.conflicts import open_ids, retire
from bootenv.errors import BootenvError, FatalError, RetryableError
from bootenv.extract import Stats, TreeWriter
from bootenv.fetchahead import FetchAhead, Fetched
from bootenv.journal import Journal, syncfs
from bootenv.log import human_bytes
from bootenv.manifest import Chunk, Component
from bootenv.merge import MergeState
from bootenv.stream import Piece
from bootenv.writeback import Flusher

log = logging.getLogger(__name__)

STREAM_DIED = "a layout stream process died (killed: out of memory?); a re-run resumes"


@dataclass(frozen=True)
class ComponentResult:
    """What became of one component: the scheduler's, and layout.py's once it has merged
    the component's dpkg status."""

    name: str
    status: str  # done, resumed (already laid out by an earlier run), failed
    files: int = 0
    bytes: int = 0
    identical: int = 0
    merged: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    code: int = 0  # a failed component's exit code (errors.py): 4 for data that did not verify
    # When its files were in and durable (or it failed, or was found done by an earlier
    # run), in seconds after the layout began; its dpkg merge and activation come later.
    ready_after: float = 0.0


class Pool(Protocol):
    """Where the scheduler's jobs run: the stream processes, or this process (Inline)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]: ...


class Inline:
    """An executor that runs each job at once, in this process: the one-stream case."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # re-raised by result(), as a pool would
            fut.set_exception(exc)
        return fut


def _fetch_error(fetch: Future[Fetched], *, strict: bool = False) -> BaseException | None:
    """The error a fetch that is ending ended with: it has marked its piece failed, or
    (`strict`) its stream has read all of it, so only its last checks are left. Should it
    not end within 30 s, that is an error too when `strict`."""
    try:
        return fetch.exception(timeout=30)
    except TimeoutError:
        return FatalError("the download of a piece that was all in did not end") if strict else None
    except CancelledError:
        return None


_Ready = tuple[int, int, str, Component, int, tuple[str, ...]]  # priority, seq, kind, comp, index, redirect
_URGENT = -(1 << 62)


class Scheduler:
    """Keep `width` jobs running, the ready piece with the most work first (so no big
    piece starts last); a component's first piece and its final job go ahead of any
    piece. Every piece is fetched and verified ahead (fetchahead.py) and handed to a
    stream once it is in, or, for a large piece checked block by block, once its first
    block is."""

    def __init__(
        self, width: int, root: Path, privileged: bool, ahead: FetchAhead, began: float | None = None
    ) -> None:
        # The layout's start: components' ready_after counts from it.
        self.began = time.monotonic() if began is None else began
        self.pool: Pool = Inline()  # set by run()
        self.width, self.root = width, root
        self.depth = width  # jobs given to the pool at once (run() sets it)
        self.privileged, self.ahead = privileged, ahead
        self.results: dict[str, ComponentResult] = {}
        self.got: dict[str, dict[int, Piece]] = {}
        self.started: dict[str, float] = {}
        self.jobs: dict[Future[Any], tuple[str, Component, int]] = {}
        self.ready: list[_Ready] = []
        self.later: dict[str, Component] = {}  # first piece being laid out: the others wait
        self.flusher: Flusher | None = None  # set by run()
        self.seq = 0
        self.dead = False  # a stream process died: no job starts again

    def _since(self) -> float:
        return time.monotonic() - self.began

    def push(
        self, priority: int, kind: str, comp: Component, index: int, redirect: tuple[str, ...] = ()
    ) -> None:
        self.seq += 1
        self.ready.append((priority, self.seq, kind, comp, index, redirect))

    def run(self, pool: Pool, comps: list[Component]) -> list[ComponentResult]:
        """Every piece, then every component's final job. The streams are forked by now,
        so a thread may start: the flusher syncs what they write as they go."""
        with Flusher(self.root) as self.flusher:
            return self._run(pool, comps)

    def _run(self, pool: Pool, comps: list[Component]) -> list[ComponentResult]:
        self.pool = pool
        # One job per stream, and one more waiting in the pool's queue: a stream that ends
        # a piece starts the next at once, instead of idling while this process hears of
        # it and picks one (1-8 ms per piece in a traced layout of LAMP on 2 streams, the
        # fetch threads holding the GIL; 60-100 ms of each stream's 0.4 s). The one-stream
        # executor runs each job as it is given.
        self.depth = self.width if isinstance(pool, Inline) else self.width + 1
        journal = Journal(self.root)
        still_open: dict[str, tuple[str, ...]] | None = None  # read once, if a component is resumed
        for comp in comps:
            self.got[comp.name] = {}
            if journal.reached(comp.name, comp.data.sha256, "files"):
                log.info("%s: already laid out by an earlier run", comp.name)
                # Its conflicts were found by that run, which may have stopped before it
                # reported them: the open ones are reported again.
                still_open = open_ids(self.root) if still_open is None else still_open
                self.results[comp.name] = ComponentResult(
                    comp.name, "resumed", conflicts=still_open.get(comp.name, ()), ready_after=self._since()
                )
                continue
            self.started[comp.name] = time.monotonic()
            self.push(_URGENT, "piece", comp, 0)
        self.dispatch()
        while self.jobs or self.ready:
            # A free stream waits for a job to end, a chunk to be in (one that already is
            # returns at once, and dispatch() starts it), or a released fetch to stop (its
            # slot then lets the next chunk be fetched).
            free = len(self.jobs) < self.depth
            waitable = [*self.jobs, *(self.fetching() + self.ahead.draining() if free else [])]
            if not waitable:
                before = len(self.ready)
                self.dispatch()
                assert self.jobs or len(self.ready) < before, "ready work that nothing will start"
                continue
            done, _ = wait(waitable, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut in self.jobs:
                    self.finished(fut)
            self.dispatch()
        return [self.results[c.name] for c in comps]

    def dispatch(self) -> None:
        """Fail the components a fetch failed for; start what can start, in priority
        order; then fetch the next chunks ahead."""
        for name, exc in self.ahead.failures():
            self.fetch_failed(name, exc)
        self.ready.sort()
        waiting = []
        for entry in self.ready:
            if entry[3].name in self.results:
                continue  # its component failed meanwhile
            if len(self.jobs) >= self.depth or not self.start(entry):
                waiting.append(entry)
        self.ready = [e for e in waiting if e[3].name not in self.results]
        self.fetch_ahead()

    def ready_pieces(self) -> list[tuple[Component, int]]:
        """The pieces that can start, in the order they will."""
        return [
            (comp, index)
            for _, _, kind, comp, index, _ in sorted(self.ready)
            if kind == "piece" and comp.name not in self.results
        ]

    def fetching(self) -> list[Future[Any]]:
        """The fetches of ready pieces: once one is in (or the first block of one checked
        block by block), a free stream can be given it."""
        keys = [(comp.name, index) for comp, index in self.ready_pieces()]
        return [f for f in map(self.ahead.arrival, keys) if f is not None]

    def fetch_ahead(self) -> None:
        """Fetch chunks ahead: the ready pieces' first, in the order they will start, then
        the other pieces of the components whose first piece (their directories) is being
        laid out, so the connections do not idle meanwhile. Those take only the first
        chunk ahead per stream: the second is kept for pieces that can start."""
        ready = [(comp, index, True) for comp, index in self.ready_pieces()]
        later = sorted(
            ((comp, i, False) for comp in self.later.values() for i in range(1, len(comp.pieces()))),
            key=lambda c: -_work(c[0].pieces()[c[1]]),
        )
        for comp, index, second in ready + later:
            if self.ahead.get((comp.name, index)):
                continue
            if not self.ahead.room(comp.pieces()[index].size, second=second):
                break
            self.ahead.start(comp, index)

    def start(self, entry: _Ready) -> bool:
        try:
            return self._start(entry)
        except BrokenProcessPool:  # a stream died, and no job has told us yet
            self.stream_died()
            return True

    def _start(self, entry: _Ready) -> bool:
        _, _, kind, comp, index, redirect = entry
        if kind == "final":
            job = self.pool.submit(_finish, comp, self.root, self.privileged, self.got[comp.name][0].created)
        else:
            key = (comp.name, index)
            fetch = self.ahead.get(key)
            if fetch is None:
                return False
            if fetch.done() and (exc := fetch.exception()) is not None:
                self.fetch_failed(comp.name, exc)
                return True
            if not self.ahead.can_hand_over(key):
                return False  # once it is in and verified (or its first block is)
            got = self.ahead.hand_over(key)
            self._laying_out(comp, index)
            self.fetch_ahead()  # before submit: the one-stream executor runs the job right here
            try:
                job = self.pool.submit(
                    stream.lay_out_piece,
                    comp,
                    index,
                    self.root,
                    self.privileged,
                    redirect,
                    (got.path, got.ino, got.dev),
                )
            except BaseException:
                self.ahead.release(key)  # no stream has it
                raise
        self.jobs[job] = (kind, comp, index)
        return True

    def _laying_out(self, comp: Component, index: int) -> None:
        if index == 0 and len(comp.pieces()) > 1:
            self.later[comp.name] = comp

    def fetch_failed(self, name: str, exc: BaseException) -> None:
        """A piece of `name` could not be fetched or did not verify: the component fails
        at the next dispatch, not once that piece's turn comes (its other pieces would be
        wasted work)."""
        if not isinstance(exc, (BootenvError, OSError)):
            raise exc
        if name not in self.results:
            log.error("%s: %s", name, exc)
        self.fail(name, str(exc), exc.exit_code if isinstance(exc, BootenvError) else 1)

    def fail(self, name: str, error: str | None, code: int = 1) -> None:
        if name not in self.results:
            took = time.monotonic() - self.started[name]
            self.results[name] = ComponentResult(
                name, "failed", error=error, seconds=took, code=code, ready_after=self._since()
            )
        self.ready = [r for r in self.ready if r[3].name != name]
        self.later.pop(name, None)
        self.ahead.drop(name)

    def stream_died(self) -> None:
        """A stream process was killed (the OOM killer, a kill -9): the pool is broken
        and runs no job again. Every component not yet in fails, the ones a stream had
        (it cannot tell which stream died) and the ones waiting alike; the others go on
        to their dpkg merge and activation, and a re-run resumes the failed ones."""
        if not self.dead:
            log.error("%s", STREAM_DIED)
        self.dead = True
        for name in [n for n in self.started if n not in self.results]:
            self.fail(name, STREAM_DIED, RetryableError.exit_code)

    def finished(self, fut: Future[Any]) -> None:
        kind, comp, index = self.jobs.pop(fut)
        took = time.monotonic() - self.started[comp.name]
        if kind == "final":
            try:
                fut.result()
                # The final job's syncfs opened a description of its own, which is not
                # told of an error the flusher saw first: the flusher is asked too.
                if self.flusher is not None:
                    self.flusher.check()
                done = _done(comp, self.got[comp.name], took, self._since())
                retire(self.root, comp.name, done.conflicts)  # what an older version left
                Journal(self.root).set(comp.name, comp.data.sha256, "files")
            except BrokenProcessPool:
                self.stream_died()
            except (OSError, BootenvError) as exc:
                code = exc.exit_code if isinstance(exc, BootenvError) else 1
                self.results[comp.name] = ComponentResult(
                    comp.name, "failed", error=str(exc), seconds=took, code=code, ready_after=self._since()
                )
            else:
                self.results[comp.name] = done
            return
        key = (comp.name, index)
        try:
            piece: Piece = fut.result()
        except BrokenProcessPool:
            self.ahead.release(key)
            self.stream_died()
            return
        # A piece read as it arrives: its stream stops when the fetch gives up, and the
        # fetch's error says why (the stream saw only that the download ended). A stream
        # that read it all may be done before the fetch's last check, of the whole
        # piece's sha256, and that check must not be lost: its fetch is waited for (it
        # has nothing left to download). Asked before the release, which would cancel a
        # fetch still running.
        fetch, why = self.ahead.get(key), None
        check = piece.stats is not None or self.ahead.failed_early(key)
        if fetch is not None and self.ahead.streamed(key) and check:
            why = _fetch_error(fetch, strict=piece.stats is not None)
        self.ahead.release(key)
        self.got[comp.name][index] = piece
        if why is not None:
            self.fetch_failed(comp.name, why)
            return
        if piece.stats is None:
            self.fail(comp.name, piece.error, piece.code)
            return
        pieces = comp.pieces()
        if index == 0:
            self.later.pop(comp.name, None)
            if comp.name not in self.results:  # a chunk fetched ahead may have failed it
                for i in range(1, len(pieces)):
                    self.push(-_work(pieces[i]), "piece", comp, i, piece.redirect)
        if comp.name not in self.results and len(self.got[comp.name]) == len(pieces):
            self.push(_URGENT, "final", comp, 0)


def _work(chunk: Chunk) -> int:
    """How long a piece takes, for the order they start in: the bytes fetched plus the
    bytes written. Its compressed size alone misleads: mysql's 102 MB of redo log (zeros)
    come in 0.26 MB, last of its chunks by that measure, and then held the run's end."""
    return chunk.size + chunk.raw_size


def _done(comp: Component, pieces: dict[int, Piece], took: float, ready_after: float) -> ComponentResult:
    total = Stats()
    for _, piece in sorted(pieces.items()):
        assert piece.stats is not None
        s = piece.stats
        total.files += s.files
        total.bytes += s.bytes
        total.identical += s.identical
        total.merged += s.merged
        total.conflicts += s.conflicts
        total.warnings += s.warnings
    log.info("%s: %d files, %s in %.1f s", comp.name, total.files, human_bytes(total.bytes), took)
    return ComponentResult(
        comp.name,
        "done",
        total.files,
        total.bytes,
        total.identical,
        tuple(total.merged),
        tuple(total.conflicts),
        tuple(total.warnings),
        seconds=took,
        ready_after=ready_after,
    )


def _finish(comp: Component, root: Path, privileged: bool, created: tuple[tuple[str, int], ...]) -> None:
    """Every piece is in: directory mtimes, then durable. The scheduler then records it
    in the journal, unless the flusher saw a write error."""
    writer = TreeWriter(root, comp.name, privileged=privileged, merge=MergeState(root))
    try:
        writer.finish(list(created))
    finally:
        writer.close()
    syncfs(root)
