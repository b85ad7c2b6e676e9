"""Fetch component chunks ahead of the streams that lay them out, and verify them first.

A stream that fetched its own chunk held its connection idle while it wrote the chunk's
files, and wrote nothing while it waited for the next chunk. Here the layout process
fetches every piece (a chunk, or a whole blob that has no chunks) on `width` threads (one
connection each) and checks its size and sha256 before a stream is given it, by path
(/proc/<pid>/fd/<n>, which a forked stream can open). Downloads go on while the streams
write files, and no byte of a piece that fails its check ever reaches a file.

A piece of up to IN_MEMORY bytes waits in memory (a memfd). A larger one, a chunk holding
one big file or a large blob without chunks, waits in an unnamed temp file (O_TMPFILE) on
the target's own filesystem, which vanishes when it is closed or the process dies. That
takes room on the target: the compressed piece, for the few pieces the streams hold or
have fetched ahead. A stream frees what it has read of its piece as it goes (Draining,
draining.py): a piece being laid out holds only what is still to be read of it. A blob
without chunks is downloaded whole before its first file is placed (capture chunks every
component larger than one chunk).

A chunk whose manifest entry pins each block of it (capture does for chunks over 32 MiB)
is checked block by block instead: only a block that matched is appended to its file,
and a stream may have the piece once its first block is in, reading what has arrived
(arriving.py) while the rest downloads. If a block fails, or the download does, the file
is marked (mode 0) and the stream stops; the file stays open until the piece is
released, so its fd number cannot be reused under a stream that has its path.

Pieces fetched (or being fetched) and not yet handed over wait on top of the ones the
streams are laying out: one per stream, and a second per stream while they hold less
than AHEAD_BYTES per stream (so a stream that syncs or merges does not stop the
downloads). The one more the layout queues for the streams, with two streams or more,
counts as one of those. Memory stays bounded by a few chunks of at most IN_MEMORY per
stream.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bootenv.atfd import TMP_PREFIX
from bootenv.errors import FatalError, VerificationError
from bootenv.httpreader import ReadAbortedError
from bootenv.log import human_bytes
from bootenv.manifest import Chunk, Component
from bootenv.source import Source, open_source
from bootenv.writeback import write_all

log = logging.getLogger(__name__)

READ = 1 << 20
AHEAD_BYTES = 16 << 20  # per stream, for the second chunk ahead
IN_MEMORY = 32 << 20  # a larger piece waits on the target's disk, not in memory
Key = tuple[str, int]  # (component, chunk index)


@dataclass(frozen=True)
class Fetched:
    fd: int
    path: str  # what a stream opens
    ino: int  # the file's inode and device: a stream checks it opened this one and no other
    dev: int


class FetchCancelledError(FatalError):
    """A fetch stopped because nobody wants its piece any more."""


def check_chunk(comp: Component, chunk: Chunk, size: int, sha256: str) -> None:
    """The bytes of `chunk` (its size and sha256) are what the manifest pins, or fail."""
    if size != chunk.size or sha256 != chunk.sha256:
        raise VerificationError(f"{comp.name}: sub-image does not match its sha256; not activated")


def open_fetched(path: str, ino: int, dev: int) -> BinaryIO:
    """Open a chunk handed over by path, and make sure it is that chunk's file. Open for
    writing too: its stream frees what it has read (Draining)."""
    f: BinaryIO
    try:
        f = open(path, "r+b")
    except PermissionError:  # not ours to write (an odd umask made it 0400): kept whole
        f = open(path, "rb")
    st = os.fstat(f.fileno())
    if (st.st_ino, st.st_dev) != (ino, dev):
        f.close()
        raise FatalError(f"{path} is not the fetched chunk any more")
    return f


class FetchAhead:
    def __init__(self, image: str, width: int, spill: Path) -> None:
        self._image = image
        self._width = width
        self._spill = spill  # a directory on the target's filesystem, for the large pieces
        self._pool = ThreadPoolExecutor(width, thread_name_prefix="fetch")
        self._local = threading.local()
        self._futures: dict[Key, Future[Fetched]] = {}
        self._handed: set[Key] = set()  # given to a stream, not yet released
        self._stop = threading.Event()
        self._sizes: dict[Key, int] = {}
        # Released while still downloading: they stop at their next read, and keep their
        # slot (and their size) until they have.
        self._lock = threading.Lock()
        self._cancelled: dict[Key, tuple[int, Future[Fetched]]] = {}
        self._reading: dict[Key, BinaryIO] = {}  # the open downloads, to abort when released
        self._early: dict[Key, Fetched] = {}  # pieces checked block by block (streamed)
        self._arrived: dict[Key, Future[None]] = {}  # set once their first block is in

    def get(self, key: Key) -> Future[Fetched] | None:
        return self._futures.get(key)

    def draining(self) -> list[Future[Fetched]]:
        """Released fetches still downloading: a slot frees up when one ends."""
        return [fut for _, fut in self._draining()]

    def _draining(self) -> list[tuple[int, Future[Fetched]]]:
        with self._lock:
            return [(n, fut) for n, fut in self._cancelled.values() if not fut.done()]

    def failures(self) -> list[tuple[str, BaseException]]:
        """(component, error) of the fetches that failed and are not dropped, whether or
        not a stream has been handed the piece (one still reading it fails with it)."""
        out = []
        for (name, _), fut in self._futures.items():
            if fut.done() and not fut.cancelled() and (exc := fut.exception()) is not None:
                out.append((name, exc))
        return out

    def room(self, size: int, *, second: bool = True) -> bool:
        """May a chunk of `size` bytes be fetched ahead now? One per stream may; with
        `second`, a second per stream while they hold under AHEAD_BYTES per stream. A
        piece handed over beyond one per stream waits for a free stream (the layout
        queues one, with two streams or more): it counts as one ahead."""
        draining = [n for n, _ in self._draining()]
        waiting = [n for k, n in self._sizes.items() if k in self._handed][self._width :]
        sizes = [n for k, n in self._sizes.items() if k not in self._handed] + draining + waiting
        held = sum(sizes)
        return len(sizes) < self._width or (
            second and len(sizes) < 2 * self._width and held + size <= AHEAD_BYTES * self._width
        )

    def start(self, comp: Component, index: int) -> None:
        key = (comp.name, index)
        chunk = comp.pieces()[index]
        self._sizes[key] = chunk.size
        fd = None
        if chunk.blocks:  # checked block by block: a stream may have it before it is all in
            try:
                fd = self._holder(comp, index, chunk.size)
            except FatalError as exc:
                failed: Future[Fetched] = Future()
                failed.set_exception(exc)
                self._futures[key] = failed
                return
            self._early[key] = _fetched(fd)
            self._arrived[key] = Future()
        self._futures[key] = self._pool.submit(self._fetch, comp, index, fd)

    def streamed(self, key: Key) -> bool:
        """Whether a stream may start on this piece while it is still being fetched."""
        return key in self._early

    def arrival(self, key: Key) -> Future[Fetched] | Future[None] | None:
        """What a stream waits for before it can have this piece: its first verified
        block for a piece checked block by block, else the whole piece."""
        arrived = self._arrived.get(key)
        if arrived is not None and not (arrived.done() and arrived.exception() is not None):
            return arrived
        return self._futures.get(key)  # (a failed one: the fetch's end reports why)

    def can_hand_over(self, key: Key) -> bool:
        arrival = self.arrival(key)
        return arrival is not None and arrival.done() and arrival.exception() is None

    def hand_over(self, key: Key) -> Fetched:
        self._handed.add(key)
        if key in self._early:
            return self._early[key]
        return self._futures[key].result()

    def failed_early(self, key: Key) -> bool:
        """Whether the fetch of a piece a stream may be reading as it arrives has given up
        (it marks the file first, then ends; or it has ended, if the mark failed)."""
        early, fut = self._early.get(key), self._futures.get(key)
        if early is None or fut is None:
            return False
        ended = fut.done() and not fut.cancelled() and fut.exception() is not None
        return ended or _marked(early.fd)

    def release(self, key: Key) -> None:
        """Free a chunk's memory: its stream is done with it, or nobody will want it."""
        self._handed.discard(key)
        early = self._early.pop(key, None)  # its file is ours to close, once its fetch ends
        self._arrived.pop(key, None)
        size = self._sizes.pop(key, 0)
        fut = self._futures.pop(key, None)
        if fut is None or fut.cancel():
            if early:
                os.close(early.fd)
            return
        if not fut.done():
            with self._lock:
                self._cancelled[key] = (size, fut)
                _abort(self._reading.get(key))  # a stalled read ends now, not at its timeout

            def ended(f: Future[Fetched]) -> None:
                with self._lock:
                    self._cancelled.pop(key, None)
                _close(f, early)

            fut.add_done_callback(ended)
        else:
            _close(fut, early)

    def drop(self, component: str) -> None:
        """A component failed: free its chunks that no stream has (a stream's chunk is
        released when its job ends; closing it now could hand its fd number to another)."""
        for key in [k for k in self._futures if k[0] == component and k not in self._handed]:
            self.release(key)

    def stop(self) -> None:
        """Abort every download now (bootenv/httpreader.py), freeing nothing: a stream reading
        a piece as it arrives sees it fail at once, not after the rest of its download."""
        self._stop.set()
        with self._lock:
            for src in self._reading.values():
                _abort(src)

    def close(self) -> None:
        """Stop fetching and free every chunk. The streams must be done: call this after
        their pool has shut down."""
        self.stop()
        for key in list(self._futures):
            self.release(key)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _source(self) -> Source:
        src: Source | None = getattr(self._local, "source", None)
        if src is None:
            src = self._local.source = open_source(self._image)  # one connection per thread
        return src

    def _fetch(self, comp: Component, index: int, fd: int | None) -> Fetched:
        key = (comp.name, index)
        chunk = comp.pieces()[index]
        if fd is None:
            fd = self._holder(comp, index, chunk.size)
        arrived = self._arrived.get(key)
        blocks = _Blocks(comp, chunk, fd, arrived) if chunk.blocks else None
        try:
            sha = hashlib.sha256()
            size = 0
            # A blob without chunks is asked for whole: its length must be the manifest's.
            offset = chunk.offset if comp.chunks else None
            src = self._source().open(comp.data.file, chunk.size, offset)
            with self._lock:
                self._reading[key] = src
                if self._stop.is_set() or key in self._cancelled:
                    _abort(src)
            try:
                while size <= chunk.size and (data := src.read(READ)):
                    if self._stop.is_set() or key in self._cancelled:
                        raise FetchCancelledError(f"{comp.name}: fetch of piece {index} cancelled")
                    sha.update(data)
                    size += len(data)
                    if blocks:
                        blocks.add(data)  # the file grows a block at a time ...
                        os.utime(fd)  # ... its mtime at each read: a stream sees it alive
                    else:
                        write_all(fd, data)
            except ReadAbortedError as exc:
                raise FetchCancelledError(f"{comp.name}: fetch of piece {index} cancelled") from exc
            finally:
                with self._lock:
                    if self._reading.get(key) is src:
                        del self._reading[key]
                src.close()
            if blocks:
                blocks.finish(size)
            check_chunk(comp, chunk, size, sha.hexdigest())
        except BaseException as exc:
            if blocks:
                # A stream may be reading it, or have its path: the file stays open (so
                # its fd number is not reused) until the piece is released.
                mark_failed(fd)
                if arrived is not None and not arrived.done():
                    arrived.set_exception(exc)
            else:
                os.close(fd)
            raise
        return _fetched(fd)

    def _holder(self, comp: Component, index: int, size: int) -> int:
        """Where a piece waits until it is laid out: memory, or the target's disk."""
        if size <= IN_MEMORY:
            return os.memfd_create(f"{comp.name}.{index}")
        log.info(
            "%s: piece %d (%s) waits on the target's disk until it is verified",
            comp.name,
            index,
            human_bytes(size),
        )
        try:
            try:
                return os.open(self._spill, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            # A filesystem without O_TMPFILE (NFS, an older overlayfs): a named temp file,
            # unlinked at once, which is as good once it has no name.
            fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}piece-", dir=self._spill)
            os.unlink(name)
            return fd
        except OSError as exc:
            raise FatalError(
                f"{comp.name}: cannot hold a {human_bytes(size)} piece on {self._spill}'s "
                f"filesystem to verify it: {exc.strerror}"
            ) from exc


def _fetched(fd: int) -> Fetched:
    st = os.fstat(fd)
    return Fetched(fd, f"/proc/{os.getpid()}/fd/{fd}", st.st_ino, st.st_dev)


class _Blocks:
    """Append a piece to its file one verified block at a time: whatever a stream can
    read of it has matched its sha256 in the manifest."""

    def __init__(self, comp: Component, chunk: Chunk, fd: int, arrived: Future[None] | None) -> None:
        self.comp, self.chunk, self.fd = comp, chunk, fd
        self.arrived = arrived  # set once the first block is in
        self.pending = bytearray()
        self.index = 0

    def add(self, data: bytes) -> None:
        self.pending += data
        while len(self.pending) >= self.chunk.block_size and self.index < len(self.chunk.blocks):
            self._flush(self.chunk.block_size)

    def finish(self, size: int) -> None:
        if size == self.chunk.size and self.pending:
            self._flush(len(self.pending))

    def _flush(self, n: int) -> None:
        block = memoryview(self.pending)[:n]
        if hashlib.sha256(block).hexdigest() != self.chunk.blocks[self.index]:
            raise VerificationError(
                f"{self.comp.name}: sub-image does not match its sha256 (block {self.index} of a "
                "chunk); not activated"
            )
        write_all(self.fd, block)
        block.release()
        del self.pending[:n]
        self.index += 1
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)


def _abort(src: BinaryIO | None) -> None:
    abort = getattr(src, "abort", None)  # an HTTP download (a local file does not stall)
    if abort is not None:
        abort()


def mark_failed(fd: int) -> None:
    """Tell a stream reading this piece as it arrives that no more will come (arriving.py):
    the file's mode drops to 0."""
    try:
        os.fchmod(fd, 0)
    except OSError as exc:  # the stream gives up on its own, later (arriving.GIVE_UP)
        log.warning("could not mark a failed piece for its stream: %s", exc.strerror)


def _marked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_mode & 0o777 == 0
    except OSError:
        return False


def _close(fut: Future[Fetched], early: Fetched | None) -> None:
    if early is not None:  # a piece read as it arrives: the file outlives a failed fetch
        os.close(early.fd)
    elif not fut.cancelled() and fut.exception() is None:
        os.close(fut.result().fd)
