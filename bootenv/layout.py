"""`bootenv layout`: lay out component sub-images in a root tree, with parallel streams.

Each stream is a process (CPU-bound tar parsing does not scale with threads) that
decompresses and lays out one piece of a component at a time (stream.py, extract.py): a
chunk, or the whole blob when it has none. The parent schedules the pieces (most work
first), and fetches and verifies each one ahead of the streams (fetchahead.py): a stream
is only ever given bytes that matched the manifest. When every stream is done, the parent merges
the dpkg status of the components that verified, in name order, and activates them:
ldconfig, daemon-reload, units. Progress goes to the log and, best effort, to a callback
URL as JSON events.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from bootenv import stream
from bootenv.activate import FAILED_UNIT, activate
from bootenv.callback import Callback, Event
from bootenv.conflicts import RECORDS, STORE, clean_stale, open_ids
from bootenv.dpkgmerge import merge_component_status
from bootenv.errors import BootenvError, FatalError, RetryableError, UserError
from bootenv.extract import Stats, TreeWriter, reserve_fd_table
from bootenv.fetchahead import FetchAhead, Fetched
from bootenv.hold import HELD_DIR, hold, release
from bootenv.journal import DIRS_DIR, STATE_DIR, Journal, syncfs
from bootenv.log import human_bytes, step
from bootenv.manifest import Chunk, Component, resolve_components
from bootenv.merge import STATE, MergeState, clean_stale_markers
from bootenv.signing import Trust
from bootenv.source import load_manifest
from bootenv.stream import Piece
from bootenv.trusted import open_trusted
from bootenv.writeback import Flusher

log = logging.getLogger(__name__)

MAX_STREAMS = 4
RETRY_WAITS = (10.0, 30.0, 60.0, 120.0, 300.0)  # before each try again, the last one repeated
# No try starts unless, as long as the last one took, it ends within this of the first
# try's start: the first-boot unit allows 2 h, and a try it kills posts no fatal error.
RETRY_BUDGET = 90 * 60.0
STREAM_DIED = "a layout stream process died (killed: out of memory?); a re-run resumes"
STOPPED = "layout stopped by a signal before it ended (the system shutting down?); a re-run resumes"


@dataclass(frozen=True)
class LayoutConfig:
    image: str  # DIR or URL
    components: str | tuple[str, ...]  # "all", "none" or names
    root: Path
    streams: int = 0  # 0: one per piece (a chunk, or a blob without chunks), up to MAX_STREAMS
    callback: str | None = None
    trust: Trust | None = None  # None: the caller checked the signature already (tests)
    force: bool = False  # root / although bootenv did not provision this system
    retries: int = 0  # a failure that may pass if tried again is tried again, this many times
    # Seconds: past it the layout stops, and fails (a re-run resumes). Armed with SIGALRM,
    # so only a layout run on the main thread (the CLI's) may have one.
    deadline: float | None = None


@dataclass(frozen=True)
class ComponentResult:
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


@dataclass(frozen=True)
class LayoutResult:
    components: tuple[ComponentResult, ...]
    added: tuple[str, ...]  # pulled in as dependencies
    notes: tuple[str, ...]  # what activation did or skipped
    seconds: float = 0.0  # the whole layout, activation included

    @property
    def failed_units(self) -> tuple[str, ...]:
        return tuple(n[len(FAILED_UNIT) :] for n in self.notes if n.startswith(FAILED_UNIT))

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.components) and not self.failed_units

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def failure(self) -> BootenvError | None:
        """What went wrong, as one error for the CLI: every failed component's reason,
        and the exit code of data that did not verify if any did, else the first's."""
        failed = [c for c in self.components if c.status == "failed"]
        if not failed and not self.failed_units:
            return None
        reasons = [_named(c.name, _first_line(c.error or "failed")) for c in failed]
        reasons += [f"unit {u} did not start" for u in self.failed_units]
        codes = [c.code or 1 for c in failed] or [1]
        err = BootenvError("layout failed: " + "; ".join(reasons))
        err.exit_code = 4 if 4 in codes else codes[0]
        return err


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _named(name: str, reason: str) -> str:
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


class Activator(Protocol):
    def __call__(self, root: Path, units: list[str]) -> list[str]: ...


def parse_components(arg: str) -> str | tuple[str, ...]:
    if arg in ("all", "none"):
        return arg
    names = tuple(n.strip() for n in arg.split(","))
    if not all(names):
        raise UserError(f"--components {arg}: needs all, none or a comma-separated list of names")
    return names


def layout(
    cfg: LayoutConfig,
    *,
    activator: Activator | None = None,
    emit: Callable[[Event], None] | None = None,
) -> LayoutResult:
    """Plan (resolve components), run the streams, then merge dpkg status and activate.

    A failure is posted to the callback as an error, also one that stops the layout
    before it has a result (the image unreachable, a bad signature), so the server shows
    why the machine stopped. With `cfg.retries`, a failure that may pass if tried again
    (RetryableError: the network, a stream killed) is tried again after a wait of
    RETRY_WAITS, that many times while another try as long as the last would end within
    RETRY_BUDGET, as a re-run would: what is done stays done. Its error is posted as not
    fatal, saying when it is tried again. Stopped by a signal, it posts STOPPED, not
    fatal: a shutdown stops it so, and the first-boot unit runs it again at the next
    boot. Past `cfg.deadline` it stops as a signal stops it, and posts that as fatal: no
    one runs it again (the first-boot unit's own timeout would kill it unheard)."""
    try:
        with contextlib.nullcontext() if cfg.deadline is None else _deadline(cfg.deadline):
            return _tries(cfg, activator, emit)
    except KeyboardInterrupt as stop:  # SIGTERM too (cli.TerminatedError), and _Expired
        # Posted here, once the try's own poster has closed: whenever the stop came,
        # during a try, its wait, or that poster's closing.
        expired = isinstance(stop, _Expired)
        message = str(stop) if expired else STOPPED
        with contextlib.closing(Callback(cfg.callback, "layout", emit=emit)) as poster:
            poster.post("error", message=message, fatal=expired)
        if expired:
            raise RetryableError(message) from None
        raise


class _Expired(KeyboardInterrupt):
    """The deadline passed (its message says so): raised in the main thread by SIGALRM's
    handler, and, as Ctrl-C is, not caught by the `except Exception` of code it
    interrupts."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Expired in the main thread `seconds` from now, unless the block has ended.
    A forked stream keeps the handler but not the timer."""

    def expire(signum: int, frame: object) -> None:
        raise _Expired(f"layout did not finish within its deadline of {seconds:.0f} s; a re-run resumes")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _tries(
    cfg: LayoutConfig, activator: Activator | None, emit: Callable[[Event], None] | None
) -> LayoutResult:
    """layout()'s tries: the first, and those its retries allow."""
    began = time.monotonic()
    for attempt in range(cfg.retries + 1):
        # Its thread starts once the streams are forked (_run_streams): none runs before.
        poster = Callback(cfg.callback, "layout", emit=emit, deferred=True)
        tried = time.monotonic()
        try:
            result, failure = _try(cfg, poster, began, activator)
            if failure is None:
                assert result is not None
                return result
            wait = RETRY_WAITS[min(attempt, len(RETRY_WAITS) - 1)]
            now = time.monotonic()
            again = (
                attempt < cfg.retries
                and _retryable(failure, result)
                and now + wait + (now - tried) - began < RETRY_BUDGET
            )
            message = _first_line(str(failure)) if str(failure).strip() else type(failure).__name__
            if again:
                message += f"; trying again in {wait:.0f} s (try {attempt + 2} of {cfg.retries + 1})"
            poster.post("error", message=message[:4000], fatal=not again)
            if not again:
                if result is not None:
                    return result
                raise failure
        finally:
            poster.close()
        log.warning("%s", message)
        time.sleep(wait)
    raise AssertionError("unreachable: the last try returns or raises")


def _try(
    cfg: LayoutConfig, poster: Callback, began: float, activator: Activator | None
) -> tuple[LayoutResult | None, Exception | None]:
    """One try: its result, and what failed (None if nothing did)."""
    try:
        result = _layout(cfg, poster, began, activator)
    except Exception as exc:
        return None, exc
    return result, result.failure()


# bootenv's own records, parents first: the journal, the merge records, the conflicts.
_STATE_DIRS = sorted(
    {
        str(parent)
        for d in (STATE_DIR, DIRS_DIR, STATE / "merge", STATE / "owners", HELD_DIR, RECORDS, STORE)
        for parent in (d, *d.parents)
    }
    - {"."},
    key=lambda rel: (rel.count("/"), rel),
)


def _refuse_symlinked_state(root: Path) -> None:
    """The records are reached by path, so a symlink on the way to them (a `/var ->
    /data/var` that the installed system resolves its own way) would take them outside
    the root, into the machine running the layout. Refused before anything is written;
    the tree writer and the dpkg merge would refuse the symlink later anyway."""
    for rel in _STATE_DIRS:
        path = root / rel
        if path.is_symlink():
            raise UserError(
                f"/{rel} under {root} is a symlink (to {os.readlink(path)}): "
                "bootenv's records would be written outside the root",
                hint="make it a directory in the target",
            )


def _retryable(failure: Exception, result: LayoutResult | None) -> bool:
    """A failure that may pass if tried again: a RetryableError; or a result in which a
    component failed so, and none failed for what it is (data that did not verify, a
    refused merge) nor any unit to start (those would fail the same way again)."""
    if result is None:
        return isinstance(failure, BootenvError) and failure.exit_code == RetryableError.exit_code
    codes = {c.code for c in result.components if c.status == "failed"}
    return codes == {RetryableError.exit_code} and not result.failed_units


def _layout(cfg: LayoutConfig, poster: Callback, began: float, activator: Activator | None) -> LayoutResult:
    # Resolved first: a symlinked root (`--root /mnt/t -> /srv/t`) is the tree it names,
    # which everything below reaches without following a symlink (extract's O_NOFOLLOW).
    try:
        root = cfg.root.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise UserError(f"{cfg.root} is not a directory ({exc})") from exc
    if not root.is_dir():
        raise UserError(f"{cfg.root} is not a directory")
    _refuse_symlinked_state(root)
    if root == Path("/") and not cfg.force:
        from bootenv.target import LAYOUT_JSON, provisioned

        if not provisioned(root):
            raise UserError(
                "refusing to lay out into the running system: bootenv did not provision it "
                f"(no {LAYOUT_JSON})",
                hint="--root a mounted target; or --force, to add components to this system's files "
                "and its dpkg database",
            )
    if root == Path("/"):
        poster.post("os_booted")  # the layout service runs in the freshly booted OS
    comps: list[Component] = []
    added: list[str] = []
    # Nothing to lay out reads no image: the single image's first boot, or an image that
    # was a directory of the ramdisk's, which the installed system cannot reach.
    if cfg.components != "none":
        manifest = load_manifest(cfg.image) if cfg.trust is None else open_trusted(cfg.image, cfg.trust)[1]
        wanted = cfg.components if isinstance(cfg.components, str) else list(cfg.components)
        order, added = resolve_components(manifest, wanted)
        if added:
            log.info("Added as dependencies: %s", ", ".join(added))
        comps = sorted((manifest.component(n) for n in order), key=lambda c: c.name)
    with _alone(root):  # the first write to the root: after the image is trusted
        return _lay_out(cfg, root, comps, added, poster, began, activator)


@contextlib.contextmanager
def _alone(root: Path) -> Iterator[None]:
    """Hold the root's layout lock for a layout: two at once (an admin's next to the
    first-boot unit's) would take each other's temp files for a killed run's, and write
    the same journal. A POSIX record lock (lockf), which belongs to this process alone:
    its forked streams do not hold it, so it ends with the layout, even killed -9 (the
    streams, which then die of it too, do so a moment later)."""
    where = root / STATE
    where.mkdir(parents=True, exist_ok=True)
    fd = os.open(where / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(
                f"another layout is running on {root}",
                hint="wait for it to end (systemctl status bootenv-layout)",
            ) from None
        yield
    finally:
        os.close(fd)


def _lay_out(
    cfg: LayoutConfig,
    root: Path,
    comps: list[Component],
    added: list[str],
    poster: Callback,
    began: float,
    activator: Activator | None,
) -> LayoutResult:
    clean_stale(root)  # a killed run's half-written conflict records ...
    clean_stale_markers(root)  # ... and owner markers
    journal = Journal(root)
    _guarded(
        "not held back during the layout",
        hold,
        root,
        {c.name: c.units for c in comps if not journal.reached(c.name, c.data.sha256, "done")},
    )
    results = _run_streams(cfg.image, comps, root, cfg.streams, poster, began)
    merged = [
        got if got.status == "failed" else _merge_dpkg(root, comp, got, journal)
        for comp, got in zip(comps, results, strict=True)
    ]
    final = _blocked_by_dependencies(comps, merged)
    for res in final:
        poster.send(_brief(res))
        for cid in res.conflicts:
            poster.post("conflict", component=res.name, fatal=False, data={"id": cid})
    good = [c for c, r in zip(comps, final, strict=True) if r.status != "failed"]
    for c in good:  # laid out: their units may start (a failed one's stay held)
        _guarded(f"{c.name}: units still held back", release, root, c.name, c.units)
    units = [u for c in good for u in c.units]
    with step(f"Activating {', '.join(c.name for c in good) or 'nothing'}"):
        notes = (activator or activate)(root, units) if good else []
    for c in good:
        journal.set(c.name, c.data.sha256, "done")
    result = LayoutResult(tuple(final), tuple(added), tuple(notes), time.monotonic() - began)
    if result.ok:
        poster.post("components_laid_out", data={"notes": list(notes)})
        poster.post("done")
    return result  # a failure is posted by layout()


def _guarded(what: str, fn: Callable[..., None], *args: Any) -> None:
    """Holding units back is a safeguard, not the layout's work: one that fails (a
    symlinked /etc/systemd/system) is logged, and the layout goes on."""
    try:
        fn(*args)
    except (BootenvError, OSError) as exc:
        log.warning("%s: %s", what, exc)


def _blocked_by_dependencies(comps: list[Component], results: list[ComponentResult]) -> list[ComponentResult]:
    """The results, with each component that depends (directly or not) on one that failed
    marked failed too, with that one's exit code: its files are in and its dpkg status
    merged (the journal says so, and a re-run finds them done), but its units are not
    started without what they need. Started, they would fail, and a failed unit is not
    tried again, where the dependency's failure (a download that gave up) may be."""
    by_name = {r.name: r for r in results}
    depends = {c.name: c.depends for c in comps}
    changed = True
    while changed:  # until no more blocks: a chain of dependents is a few rounds
        changed = False
        for name, res in by_name.items():
            if res.status == "failed":
                continue
            dep = next((d for d in depends[name] if d in by_name and by_name[d].status == "failed"), None)
            if dep is not None:
                why = f"not activated: it depends on {dep}, which failed"
                by_name[name] = replace(res, status="failed", error=why, code=by_name[dep].code or 1)
                changed = True
    return [by_name[r.name] for r in results]


def _merge_dpkg(root: Path, comp: Component, res: ComponentResult, journal: Journal) -> ComponentResult:
    """Merge a laid-out component's dpkg paragraphs: its result, with its packages; or
    failed (not activated) if the merge was refused (a symlink its archive planted)."""
    kept: list[str] = []
    try:
        pkgs = tuple(merge_component_status(root, comp.name, kept))
    except (BootenvError, OSError) as exc:
        log.error("%s: dpkg status not merged: %s", comp.name, exc)
        code = exc.exit_code if isinstance(exc, BootenvError) else 1
        error = f"dpkg status not merged: {exc}"
        return ComponentResult(**{**asdict(res), "status": "failed", "error": error, "code": code})
    if not journal.reached(comp.name, comp.data.sha256, "dpkg"):
        journal.set(comp.name, comp.data.sha256, "dpkg")
    warnings = (*res.warnings, *(f"dpkg database left as it was: {k}" for k in kept))
    return ComponentResult(**{**asdict(res), "packages": pkgs, "warnings": warnings})


def _brief(r: ComponentResult) -> Event:
    """A component's end, as a step event naming the component."""
    event: Event = {
        "event": "step",
        "step": "component",
        "status": "failed" if r.status == "failed" else "done",
        # Not the machine's failure by itself: layout() posts that, fatal or not (tried again).
        "fatal": False,
        "component": r.name,
        "files": r.files,
        "bytes": r.bytes,
        "elapsed": r.seconds,
        "data": {"result": r.status, "conflicts": len(r.conflicts)},
    }
    if r.error:
        event["message"] = r.error[:4000]
    return event


def default_streams(n: int) -> int:
    return max(1, min(n, MAX_STREAMS))


class Pool(Protocol):
    """Where the scheduler's jobs run: the stream processes, or this process (_Inline)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]: ...


class _Inline:
    """An executor that runs each job at once, in this process: the one-stream case."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # re-raised by result(), as a pool would
            fut.set_exception(exc)
        return fut


def _run_streams(
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
                return _Scheduler(1, root, privileged, ahead, began).run(_Inline(), comps)
            finally:
                stream.SINK.clear()
        return _run_pool(_Scheduler(width, root, privileged, ahead, began), comps, progress, poster.start)
    finally:
        ahead.close()


def _run_pool(
    sched: _Scheduler, comps: list[Component], progress: _ProgressSum, forked: Callable[[], None]
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


class _Scheduler:
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
        self.pool: Pool = _Inline()  # set by run()
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
        self.depth = self.width if isinstance(pool, _Inline) else self.width + 1
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
                Journal(self.root).set(comp.name, comp.data.sha256, "files")
            except BrokenProcessPool:
                self.stream_died()
            except (OSError, BootenvError) as exc:
                code = exc.exit_code if isinstance(exc, BootenvError) else 1
                self.results[comp.name] = ComponentResult(
                    comp.name, "failed", error=str(exc), seconds=took, code=code, ready_after=self._since()
                )
            else:
                self.results[comp.name] = _done(comp, self.got[comp.name], took, self._since())
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
