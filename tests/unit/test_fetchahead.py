"""FetchAhead: a piece is held and verified before it is handed over; memory is bounded."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bootenv.arriving as arriving_mod
import bootenv.fetchahead as fetchahead_mod
import bootenv.httpreader as httpreader_mod
import bootenv.source as source_mod
from bench import throttle
from bootenv.arriving import Arriving
from bootenv.draining import Draining
from bootenv.errors import FatalError, VerificationError
from bootenv.fetchahead import (
    AHEAD_BYTES,
    FetchAhead,
    FetchCancelledError,
    Fetched,
    Key,
    open_fetched,
)
from bootenv.httpreader import RetryPolicy
from bootenv.manifest import Blob, Chunk, Component, parse_manifest
from tests.faults.helpers import component
from tests.hostile.kit import Comp, d, f, make_image
from tests.unit.httpfault import Fault, FaultServer


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("fa") / "img", [component("good", 7, files=40)], chunk=8 << 10)


def _names(path: str, memfd: str) -> bool:
    try:
        return os.readlink(path).startswith(memfd)
    except FileNotFoundError:
        return False


def comp_of(image: Path) -> Component:
    return parse_manifest((image / "manifest.json").read_text()).component("good")


def test_a_chunk_is_fetched_into_memory_and_freed_on_release(image: Path, tmp_path: Path) -> None:
    comp = comp_of(image)
    blob = (image / comp.data.file).read_bytes()
    fds = len(os.listdir("/proc/self/fd"))
    ahead = FetchAhead(str(image), 2, spill=tmp_path)
    try:
        for i in range(len(comp.chunks)):
            ahead.start(comp, i)
        for i, chunk in enumerate(comp.chunks):
            fetched = ahead.hand_over((comp.name, i))
            assert _names(fetched.path, f"/memfd:good.{i} ")
            with open(fetched.path, "rb") as f:  # what a stream opens
                assert f.read() == blob[chunk.offset : chunk.offset + chunk.size]
            ahead.release((comp.name, i))
            assert not _names(fetched.path, f"/memfd:good.{i} ")  # closed (its number may be reused)
    finally:
        ahead.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_chunk_that_does_not_match_its_sha256_is_never_handed_over(image: Path, tmp_path: Path) -> None:
    comp = comp_of(image)
    bad = tmp_path / "img"
    bad.mkdir()
    for p in image.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    k = comp.chunks[2]
    data = bytearray((bad / comp.data.file).read_bytes())
    data[k.offset + k.size // 2] ^= 0xFF
    (bad / comp.data.file).write_bytes(bytes(data))
    fds = len(os.listdir("/proc/self/fd"))
    ahead = FetchAhead(str(bad), 1, spill=tmp_path)
    try:
        ahead.start(comp, 2)
        ahead.start(comp, 1)
        with pytest.raises(VerificationError, match="sha256"):
            ahead.hand_over((comp.name, 2))
        assert ahead.hand_over((comp.name, 1)).path  # the others are fine
    finally:
        ahead.close()
    assert len(os.listdir("/proc/self/fd")) == fds  # no memfd left open


def test_a_piece_queued_for_a_stream_counts_as_one_ahead(image: Path, tmp_path: Path) -> None:
    """With two streams the layout hands over a third piece, which waits for a free
    stream in the pool's queue: it holds its chunk as one fetched ahead does."""
    comp = comp_of(image)
    assert len(comp.chunks) >= 5
    ahead = FetchAhead(str(image), 2, spill=tmp_path)
    try:
        for i in (1, 2, 3):  # two laid out, one queued
            ahead.start(comp, i)
            ahead.hand_over((comp.name, i))
        ahead.start(comp, 4)
        assert not ahead.room(1, second=False)  # one ahead per stream: the queued one and this
        assert ahead.room(1)  # a second, small
        ahead.release((comp.name, 3))  # the queued one is laid out, and done
        assert ahead.room(1, second=False)
    finally:
        ahead.close()


def test_room_one_chunk_per_stream_and_a_second_while_small(image: Path, tmp_path: Path) -> None:
    comp = comp_of(image)
    ahead = FetchAhead(str(image), 1, spill=tmp_path)
    try:
        assert ahead.room(AHEAD_BYTES * 4)  # the first one ahead, whatever its size
        ahead.start(comp, 1)
        assert ahead.room(comp.chunks[2].size)
        assert not ahead.room(comp.chunks[2].size, second=False)  # one per stream only
        assert not ahead.room(AHEAD_BYTES)  # a second, but not a big one
        ahead.start(comp, 2)
        assert not ahead.room(1)  # never a third
        ahead.hand_over((comp.name, 1))  # a stream took one: room again
        assert ahead.room(comp.chunks[3].size)
    finally:
        ahead.close()


def test_dropping_a_failed_component_keeps_the_chunks_its_streams_hold(image: Path, tmp_path: Path) -> None:
    comp = comp_of(image)
    ahead = FetchAhead(str(image), 2, spill=tmp_path)
    try:
        ahead.start(comp, 1)
        ahead.start(comp, 2)
        held = ahead.hand_over((comp.name, 1))  # a stream is laying this one out
        waiting = ahead.get((comp.name, 2))
        assert waiting is not None
        fd2 = waiting.result().fd
        ahead.drop(comp.name)  # another chunk of the component failed
        # The stream's chunk stays open until its job ends (its number must not be reused
        # by a new memfd, which the stream would then open instead); the other is freed.
        assert _names(held.path, "/memfd:good.1 ")
        assert not _names(f"/proc/self/fd/{fd2}", "/memfd:good.2 ")
        with open_fetched(held.path, held.ino, held.dev) as f:
            assert len(f.read()) == comp.chunks[1].size
        ahead.release((comp.name, 1))
        assert not _names(held.path, "/memfd:good.1 ")
    finally:
        ahead.close()


def test_a_stream_refuses_a_path_that_is_not_its_chunk_any_more(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x")
    with pytest.raises(FatalError, match="not the fetched chunk"):
        open_fetched(str(other), other.stat().st_ino + 1, other.stat().st_dev)


def test_a_piece_too_large_for_memory_waits_unnamed_on_the_target(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetchahead_mod, "IN_MEMORY", 0)  # every piece is "large"
    comp = comp_of(image)
    blob = (image / comp.data.file).read_bytes()
    target = tmp_path / "root"
    target.mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    ahead = FetchAhead(str(image), 1, spill=target)
    try:
        ahead.start(comp, 1)
        fetched = ahead.hand_over((comp.name, 1))
        link = os.readlink(fetched.path)
        assert link.startswith(f"{target}/#") and link.endswith("(deleted)"), link  # O_TMPFILE
        assert os.stat(fetched.path).st_dev == target.stat().st_dev
        assert os.listdir(target) == [], "the piece has no name in the tree"
        chunk = comp.chunks[1]
        with open_fetched(fetched.path, fetched.ino, fetched.dev) as f:
            assert f.read() == blob[chunk.offset : chunk.offset + chunk.size]
        ahead.release((comp.name, 1))
    finally:
        ahead.close()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert os.listdir(target) == []


def test_a_large_piece_with_nowhere_to_wait_fails_with_one_line(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetchahead_mod, "IN_MEMORY", 0)
    comp = comp_of(image)
    ahead = FetchAhead(str(image), 1, spill=tmp_path / "missing")
    try:
        ahead.start(comp, 1)
        with pytest.raises(FatalError, match=r"good: cannot hold a .* piece on .*missing") as exc:
            ahead.hand_over((comp.name, 1))
        assert "\n" not in str(exc.value)
    finally:
        ahead.close()


def test_a_fetch_released_while_downloading_stops_and_keeps_its_slot_till_then(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetchahead_mod, "READ", 1024)  # several reads per chunk
    # A download that cannot be cut short (as when its connection is still being set up).
    monkeypatch.setattr(httpreader_mod.HttpReader, "abort", lambda self: None)
    comp = comp_of(image)
    chunk = comp.chunks[1]
    assert chunk.size > 4096
    with FaultServer(image) as srv:
        srv.faults[comp.data.file] = Fault(stall_at=chunk.offset + 2048, stall_seconds=1.0)
        ahead = FetchAhead(srv.url, 1, spill=tmp_path)
        try:
            ahead.start(comp, 1)
            fut = ahead.get((comp.name, 1))
            assert fut is not None and srv.stalled.wait(5)
            ahead.release((comp.name, 1))  # its component failed, say: nobody wants it now
            assert ahead.get((comp.name, 1)) is None
            assert not fut.done() and not ahead.room(1, second=False), "the download still runs"
            with pytest.raises(FetchCancelledError):
                fut.result(timeout=10)  # it stopped at its next read, not at the chunk's end
            assert ahead.room(1, second=False), "and its slot is free once it has"
        finally:
            ahead.close()


STALL = 20.0  # seconds a server holds a download up: well under the read timeout (30 s)


@pytest.mark.parametrize("how", ["release", "close"])
def test_a_download_stalled_on_the_network_is_cut_short_when_nobody_wants_it(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Its component failed (release), or the layout is ending (close): the fetch does not
    wait for the server to send its next byte, nor for the read timeout."""
    monkeypatch.setattr(fetchahead_mod, "READ", 1024)
    # Released or closed once the fetch has all the server sent and reads on the socket.
    reading = threading.Event()
    real_read = httpreader_mod.HttpReader._read_raw

    def read_raw(self: httpreader_mod.HttpReader, n: int) -> bytes:
        if self.pos == 2048:
            reading.set()
        return real_read(self, n)

    monkeypatch.setattr(httpreader_mod.HttpReader, "_read_raw", read_raw)
    comp = comp_of(image)
    chunk = comp.chunks[1]
    with FaultServer(image) as srv:
        srv.faults[comp.data.file] = Fault(stall_at=chunk.offset + 2048, stall_seconds=STALL)
        ahead = FetchAhead(srv.url, 1, spill=tmp_path)
        try:
            ahead.start(comp, 1)
            fut = ahead.get((comp.name, 1))
            assert fut is not None and reading.wait(5)
            if how == "release":
                ahead.release((comp.name, 1))
                with pytest.raises(FetchCancelledError):
                    fut.result(timeout=2 * STALL)  # a hang guard: the stall ends well before
                assert ahead.room(1, second=False), "its slot is free"
            else:
                ahead.close()
                assert fut.done()
            assert not srv.resumed.is_set(), "the fetch waited out the server's stall"
        finally:
            ahead.close()
    assert [r.start for r in srv.requests_for(comp.data.file)] == [chunk.offset], "no retry"


def test_without_o_tmpfile_a_large_piece_waits_in_a_file_unlinked_at_once(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS or an older overlayfs: O_TMPFILE fails; a named temp file, unlinked at once."""
    monkeypatch.setattr(fetchahead_mod, "IN_MEMORY", 0)
    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)
    comp = comp_of(image)
    target = tmp_path / "root"
    target.mkdir()
    ahead = FetchAhead(str(image), 1, spill=target)
    try:
        ahead.start(comp, 1)
        fetched = ahead.hand_over((comp.name, 1))
        link = os.readlink(fetched.path)
        assert link.startswith(f"{target}/.bootenv~piece-") and link.endswith(" (deleted)"), link
        assert os.listdir(target) == []
        with open_fetched(fetched.path, fetched.ino, fetched.dev) as f:
            assert len(f.read()) == comp.chunks[1].size
    finally:
        ahead.close()
    assert os.listdir(target) == []


# --- large pieces checked block by block -----------------------------------------------

BLOCK = 8192


@dataclass(frozen=True)
class _Quick(RetryPolicy):
    attempts: int = 2
    backoff: float = 0.01
    max_backoff: float = 0.02
    timeout: float = 5.0


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One chunk of about 200 kB (an incompressible file): pinned block by block."""
    big = random.Random(5).randbytes(200_000)
    comp = Comp("good", [d("opt"), f("opt/small", "x" * 100), f("opt/big", big), f("opt/z", "z")])
    return make_image(tmp_path_factory.mktemp("fa-big") / "img", [comp], chunk=8 << 10, blocks=BLOCK)


def _streamed(image: Path) -> tuple[Component, int, bytes]:
    comp = comp_of(image)
    index = next(i for i, c in enumerate(comp.chunks) if c.blocks)
    c = comp.chunks[index]
    blob = (image / comp.data.file).read_bytes()
    return comp, index, blob[c.offset : c.offset + c.size]


def test_a_piece_pinned_block_by_block_is_read_as_it_arrives(
    big_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetchahead_mod, "READ", 1024)  # a read returns what is there
    comp, index, want = _streamed(big_image)
    chunk = comp.chunks[index]
    assert len(chunk.blocks) > 10
    stall = chunk.offset + 5 * BLOCK + 100  # the server pauses inside block 5
    with FaultServer(big_image) as srv:
        srv.faults[comp.data.file] = Fault(stall_at=stall, stall_seconds=1.5)
        ahead = FetchAhead(srv.url, 1, spill=tmp_path)
        try:
            ahead.start(comp, index)
            fut = ahead.get((comp.name, index))
            assert fut is not None and ahead.streamed((comp.name, index))
            fetched = ahead.hand_over((comp.name, index))  # at once: no wait for the download
            with open_fetched(fetched.path, fetched.ino, fetched.dev) as fh:
                src = Arriving(fh, chunk.size, "good piece", fetched.path)
                head = b""
                while len(head) < 5 * BLOCK:
                    head += src.read(5 * BLOCK - len(head))
                # Five blocks read while the rest is still held by the server.
                assert srv.stalled.is_set() and not fut.done()
                rest = b""
                while part := src.read(1 << 20):
                    rest += part
            assert head + rest == want
            assert fut.result(timeout=10).fd == fetched.fd
            ahead.release((comp.name, index))
        finally:
            ahead.close()


@contextlib.contextmanager
def _reader(ahead: FetchAhead, comp: Component, index: int) -> Iterator[tuple[Fetched, Arriving]]:
    """Fetch a piece pinned block by block and read it as a stream does, as it arrives."""
    ahead.start(comp, index)
    fetched = ahead.hand_over((comp.name, index))
    with open_fetched(fetched.path, fetched.ino, fetched.dev) as fh:
        yield fetched, Arriving(fh, comp.chunks[index].size, "good piece", fetched.path)


@contextlib.contextmanager
def _read_till_it_fails(
    image: Path, tmp_path: Path, fault: Callable[[Chunk], Fault], match: str
) -> Iterator[tuple[FetchAhead, Key, Fetched, bytes, bytes]]:
    """Read a piece pinned block by block as it arrives, from a server with `fault`,
    until the reader fails with `match`; give (ahead, key, fetched, what was read, the
    piece's true bytes)."""
    comp, index, want = _streamed(image)
    with FaultServer(image) as srv:
        srv.faults[comp.data.file] = fault(comp.chunks[index])
        ahead = FetchAhead(srv.url, 1, spill=tmp_path)
        try:
            got = b""
            with _reader(ahead, comp, index) as (fetched, src), pytest.raises(FatalError, match=match):
                while part := src.read(4096):
                    got += part
            yield ahead, (comp.name, index), fetched, got, want
        finally:
            ahead.close()


def test_a_bad_block_stops_the_reader_after_the_good_ones_and_never_shows_it(
    big_image: Path, tmp_path: Path
) -> None:
    with _read_till_it_fails(
        big_image,
        tmp_path,
        lambda k: Fault(corrupt_at=k.offset + 7 * BLOCK + 10),
        "good piece: its download failed",
    ) as (ahead, key, _, got, want):
        assert got == want[: 7 * BLOCK], "exactly the blocks before the bad one"
        fut = ahead.get(key)
        assert fut is not None
        with pytest.raises(VerificationError, match=r"good: .*block 7 of a chunk"):
            fut.result(timeout=10)
        ahead.release(key)


def test_a_reader_stops_when_the_fetching_process_is_gone(tmp_path: Path) -> None:
    piece = tmp_path / "piece"
    piece.write_bytes(b"x" * 100)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    with open(piece, "rb") as fh:
        src = Arriving(fh, 1000, "good piece", f"/proc/{dead}/fd/3")
        assert src.read(1000) == b"x" * 100
        with pytest.raises(FatalError, match="the process fetching it is gone"):
            src.read(1000)


def test_a_server_that_stops_short_shows_only_the_whole_blocks(
    big_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetchahead_mod, "READ", 1024)
    monkeypatch.setattr(source_mod, "RetryPolicy", _Quick)  # two tries, no wait between
    with _read_till_it_fails(
        big_image, tmp_path, lambda k: Fault(drop_always=k.offset + 5 * BLOCK + 100), "its download failed"
    ) as (ahead, key, fetched, got, want):
        assert got == want[: 5 * BLOCK]
        fut = ahead.get(key)
        assert fut is not None and fut.exception(timeout=10) is not None
        # Failed, but its file stays open (its fd number is not reused) until released.
        with open_fetched(fetched.path, fetched.ino, fetched.dev) as fh:
            assert fh.read() == want[: 5 * BLOCK]
        ahead.release(key)
        assert not _same(fetched)


def _same(fetched: Fetched) -> bool:
    try:
        st = os.stat(fetched.path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == (fetched.ino, fetched.dev)


def test_a_reader_whose_fetcher_could_not_mark_the_file_gives_up_once_it_is_silent(
    big_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fchmod(fd: int, mode: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fetchahead_mod, "READ", 1024)
    monkeypatch.setattr(os, "fchmod", no_fchmod)
    monkeypatch.setattr(arriving_mod, "GIVE_UP", 1.0)
    # The fetch fails without marking the file: silence, then the reader gives up.
    with _read_till_it_fails(
        big_image,
        tmp_path,
        lambda k: Fault(corrupt_at=k.offset + 6 * BLOCK),
        "no sign of its download for 1 s",
    ) as (ahead, key, _, got, want):
        assert got == want[: 6 * BLOCK]
        ahead.release(key)


def test_a_piece_that_is_whole_blocks_is_all_shown(tmp_path: Path, big_image: Path) -> None:
    """A chunk of exactly two blocks: the second is flushed as it completes."""
    data = random.Random(9).randbytes(2 * BLOCK)
    where = tmp_path / "img"
    where.mkdir()
    (where / "manifest.json").write_bytes((big_image / "manifest.json").read_bytes())
    sha = hashlib.sha256(data).hexdigest()
    (where / f"{sha}.tar.zst").write_bytes(data)
    blocks = tuple(hashlib.sha256(data[i : i + BLOCK]).hexdigest() for i in (0, BLOCK))
    chunk = Chunk(0, len(data), 1, sha, BLOCK, blocks)
    comp = Component("exact", Blob(f"{sha}.tar.zst", sha, len(data), 1), (), (), 1, (), (chunk,))
    ahead = FetchAhead(str(where), 1, spill=tmp_path)
    try:
        ahead.start(comp, 0)
        fetched = ahead.hand_over(("exact", 0))
        with open_fetched(fetched.path, fetched.ino, fetched.dev) as fh:
            src = Arriving(fh, chunk.size, "exact piece", fetched.path)
            got = b""
            while part := src.read(5000):
                got += part
        assert got == data
        fut = ahead.get(("exact", 0))
        assert fut is not None and fut.result(timeout=10).fd == fetched.fd
        ahead.release(("exact", 0))
    finally:
        ahead.close()


def _fds_settle_at(n: int, *, timeout: float) -> bool:
    """Whether this process's open files come down to `n` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(os.listdir("/proc/self/fd")) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_queued_piece_released_before_its_fetch_runs_closes_its_file(
    big_image: Path, tmp_path: Path
) -> None:
    comp, index, _ = _streamed(big_image)
    first = next(i for i, c in enumerate(comp.chunks) if not c.blocks and i != 0)
    fds = len(os.listdir("/proc/self/fd"))
    with FaultServer(big_image) as srv:
        k = comp.chunks[first]
        srv.faults[comp.data.file] = Fault(stall_at=k.offset + 10, stall_seconds=1.0)
        ahead = FetchAhead(srv.url, 1, spill=tmp_path)  # one connection: the second waits
        try:
            ahead.start(comp, first)
            assert srv.stalled.wait(5)
            before = len(os.listdir("/proc/self/fd"))
            ahead.start(comp, index)  # its file is made now, its fetch queued
            assert len(os.listdir("/proc/self/fd")) == before + 1
            fut = ahead.get((comp.name, index))
            assert fut is not None and not fut.running()
            ahead.release((comp.name, index))
            assert fut.cancelled()
        finally:
            ahead.close()
    # The fetch stopped at once; the server's handler, asleep in its stall, holds its
    # socket and the blob open a little longer.
    assert _fds_settle_at(fds, timeout=5)


def test_a_slow_download_keeps_its_reader_waiting_past_the_give_up_time(
    big_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 16 kB/s a block takes 0.5 s to arrive: longer than the reader's patience, but
    each read the fetcher makes shows it alive."""
    monkeypatch.setattr(fetchahead_mod, "READ", 1024)
    monkeypatch.setattr(throttle, "CHUNK", 1024)
    monkeypatch.setattr(arriving_mod, "GIVE_UP", 0.3)
    comp, index, want = _streamed(big_image)
    with throttle.serve(big_image.parent, per_connection=16e3) as url:
        ahead = FetchAhead(f"{url}/{big_image.name}", 1, spill=tmp_path)
        try:
            got = b""
            with _reader(ahead, comp, index) as (_, src):
                while len(got) < 3 * BLOCK:
                    got += src.read(3 * BLOCK - len(got))
            assert got == want[: 3 * BLOCK]
            ahead.release((comp.name, index))
        finally:
            ahead.close()


def test_a_piece_the_stream_may_not_write_is_opened_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piece = tmp_path / "piece"
    piece.write_bytes(b"abc")
    real_open = open

    def no_write(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if path == str(piece) and "+" in mode:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_write)
    st = piece.stat()
    with open_fetched(str(piece), st.st_ino, st.st_dev) as f:
        src = Draining.of(f, f.fileno())
        assert src.read(-1) == b"abc"
