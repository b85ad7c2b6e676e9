"""What one layout stream does: decompress and lay out one piece of a component.

A stream is a process of layout's pool (or, for one stream, the layout process itself).
Its job gets a piece (a chunk, or a whole blob that has none) the parent has fetched and
verified already, by path (see fetchahead.py). It reports progress as events through
`SINK` and returns a `Piece`.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from bootenv import inflate
from bootenv.arriving import Arriving
from bootenv.atfd import reserve_fd_table
from bootenv.callback import Event
from bootenv.draining import Draining, Readable
from bootenv.errors import BootenvError, VerificationError
from bootenv.extract import Stats, TreeWriter
from bootenv.fetchahead import open_fetched
from bootenv.journal import DirLog, TempLog
from bootenv.log import human_bytes
from bootenv.manifest import Component
from bootenv.merge import MergeState
from bootenv.paxread import PaxReader
from bootenv.prefetch import Prefetch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """What one stream did with one piece (chunk) of a component."""

    component: str
    index: int
    stats: Stats | None  # None: failed
    error: str | None = None
    code: int = 0  # a failed piece's exit code (errors.py)
    created: tuple[tuple[str, int], ...] = ()  # piece 0: the directories it made
    redirect: tuple[str, ...] = ()  # piece 0: directories that conflicted


SINK: list[Callable[[Event], None]] = []  # where a stream's events go (set per process)


def init_worker(events: Any) -> None:
    SINK[:] = [events.put]
    # A stream must not outlive the layout that started it (kill -9 of the parent).
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Ctrl-C reaches the whole process group: the layout process stops the streams, each
    # after the piece it is laying out. SIGTERM kills a stream (not the handler the
    # layout process has, bootenv/cli.py): the pool's own clean-up after a stream died
    # sends it, and a stream that outlived it could hang that for good. A stream it
    # kills leaves only temp names, which the next run removes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reserve_fd_table()  # before the read-ahead thread starts


def _emit(event: Event) -> None:
    for sink in SINK:
        sink(event)


def lay_out_piece(
    comp: Component,
    index: int,
    root: Path,
    privileged: bool,
    redirect: tuple[str, ...],
    fetched: tuple[str, int, int],
) -> Piece:
    """One stream's job: decompress and lay out one piece of a component. `fetched`: the
    path, inode and device of the piece's bytes, fetched and verified already
    (fetchahead.py)."""
    pieces = comp.pieces()
    if index == 0:
        _emit(
            {
                "event": "step",
                "step": "component",
                "status": "start",
                "component": comp.name,
                "total": comp.data.size,
            }
        )
        log.info("%s: laying out %d files (%s)", comp.name, comp.files, human_bytes(comp.data.raw_size))
    with ExitStack() as held:
        try:
            # Piece 0 makes the component's directories: it logs them for a re-run.
            dirs = held.enter_context(DirLog(root, comp.name, comp.data.sha256)) if index == 0 else None
            temps = held.enter_context(TempLog(root, comp.name))  # where its temp names are, for a sweep
            writer = TreeWriter(
                root,
                comp.name,
                privileged=privileged,
                merge=MergeState(root),
                piece=index,
                redirect=redirect,
                dirs=dirs,
                temps=temps,
            )
            held.callback(writer.close)
            with open_fetched(*fetched) as f:
                src: Readable = f
                stop = None
                if pieces[index].blocks:  # checked block by block: it may still be arriving
                    src = arriving = Arriving(f, pieces[index].size, f"{comp.name} piece {index}", fetched[0])
                    stop = arriving.stop
                draining = Draining.of(src, f.fileno())  # what is read of it is freed as it goes
                try:
                    _lay_out(comp, index, draining, writer, partial=index < len(pieces) - 1, stop=stop)
                finally:
                    draining.close()  # before `f` is: its fd number may be reused
        except (BootenvError, OSError, zstandard.ZstdError) as exc:
            log.error("%s: %s", comp.name, exc)
            code = exc.exit_code if isinstance(exc, BootenvError) else 1
            return Piece(comp.name, index, None, error=str(exc), code=code)
    return Piece(
        comp.name, index, writer.stats, None, created=tuple(writer.created_dirs), redirect=writer.redirected
    )


def _lay_out(
    comp: Component,
    index: int,
    src: Readable,
    writer: TreeWriter,
    *,
    partial: bool,
    stop: Callable[[], None] | None = None,
) -> None:
    """Decompress `src` on a read-ahead thread and place its members. On a failure,
    `stop` makes a read-ahead thread that waits on `src` give up first."""
    limit = comp.pieces()[index].raw_size
    inf = inflate.take()
    ahead: Prefetch | None = None
    try:
        z = inf.reader(src)
        ahead = Prefetch(z)
        try:
            reader = PaxReader(ahead, limit=limit, partial=partial)
            last = time.monotonic()
            for member in reader:
                writer.place(member, reader)
                now = time.monotonic()
                if now - last >= 1.0:
                    last = now
                    s = writer.stats
                    _emit(
                        {
                            "event": "progress",
                            "component": comp.name,
                            "piece": index,
                            "files": s.files,
                            "bytes": s.bytes,
                        }
                    )
            reader.drain()
        except BaseException:
            if stop is not None:
                stop()  # before the read-ahead thread is joined
            raise
        finally:
            ahead.close()
    except zstandard.ZstdError as exc:
        raise VerificationError(f"{comp.name}: corrupt zstd stream: {exc}") from exc
    finally:
        # A read the read-ahead thread is still in (Prefetch.close gave up waiting) goes
        # on with the reader's decompressor and the inflater's buffer once it returns:
        # the inflater is not reused, and the reader is not left through `with`, whose
        # exit drops its decompressor under the thread (it crashed the process). The
        # thread is a daemon, and ends after that read.
        if ahead is None or ahead.ended:
            inflate.give_back(inf)
