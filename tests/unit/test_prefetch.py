"""Prefetch: the same bytes, errors raised where they happen, and a prompt close."""

from __future__ import annotations

import io
import random
import threading

import pytest

from bootenv import prefetch
from bootenv.prefetch import Prefetch


class Flaky:
    """A source that gives `good` bytes in small reads, then raises."""

    def __init__(self, good: bytes) -> None:
        self.src = io.BytesIO(good)

    def readinto(self, buf: bytearray, /) -> int:
        n = self.src.readinto(memoryview(buf)[:777])
        if not n:
            raise OSError("connection reset")
        return n


def test_reads_give_the_source_bytes_in_order() -> None:
    data = random.Random(1).randbytes(3 << 20)
    rng = random.Random(2)
    got = []
    with Prefetch(io.BytesIO(data), block=100_000, depth=3) as ahead:
        while part := ahead.read(rng.randrange(1, 300_000)):
            got.append(part)
        assert ahead.read(10) == b""  # and it stays ended
    assert b"".join(got) == data


def test_read_all() -> None:
    data = bytes(range(256)) * 5000
    with Prefetch(io.BytesIO(data), block=4096) as ahead:
        assert ahead.read(10) == data[:10]
        assert ahead.read() == data[10:]


def test_an_error_in_the_source_reaches_the_reader_after_the_good_bytes() -> None:
    with Prefetch(Flaky(b"x" * 5000), block=1000) as ahead:
        got = b""
        with pytest.raises(OSError, match="connection reset"):
            while True:
                got += ahead.read(4096)
        assert got == b"x" * 5000


def test_close_does_not_wait_for_a_reader_that_stopped_reading() -> None:
    ahead = Prefetch(io.BytesIO(bytes(64 << 20)), block=1 << 20, depth=2)
    ahead.read(10)  # the thread fills the queue and blocks on it
    ahead.close()
    assert not ahead._thread.is_alive()  # it saw the stop while waiting for a free buffer


def test_blocks_are_lent_from_a_fixed_pool_and_outlive_the_prefetch() -> None:
    data = random.Random(3).randbytes(2 << 20)
    with Prefetch(io.BytesIO(data), block=65_536, depth=2) as first:
        got, buffers = [], set()
        while view := first.view(100_000):
            buffers.add(id(view.obj))
            got.append(bytes(view))
        pool = {id(buf) for buf in first._pool}
    assert b"".join(got) == data
    assert buffers == pool and len(pool) == 3  # two read ahead while one is read
    with Prefetch(io.BytesIO(data), block=65_536, depth=2) as second:
        assert {id(buf) for buf in second._pool} == pool  # taken over, not allocated again
        assert second.read(5) == data[:5]


class Stuck:
    """A source whose read never ends until it is let go."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def readinto(self, buf: bytearray, /) -> int:
        self.go.wait(10)
        return 0


def test_buffers_a_read_may_still_write_into_are_not_handed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch, "JOIN_TIMEOUT", 0.1)
    src = Stuck()
    ahead = Prefetch(src, block=4096, depth=1)
    mine = {id(buf) for buf in ahead._pool}
    ahead.close()  # its thread is still in readinto
    try:
        with Prefetch(io.BytesIO(b"abc"), block=4096, depth=1) as other:
            assert not mine & {id(buf) for buf in other._pool}
            assert other.read() == b"abc"
    finally:
        src.go.set()


def test_a_closed_prefetch_refuses_to_read() -> None:
    """Its buffers may belong to the next Prefetch already."""
    ahead = Prefetch(io.BytesIO(b"x" * 10_000), block=4096)
    assert ahead.read(10) == b"x" * 10
    ahead.close()
    with pytest.raises(ValueError, match="closed"):
        ahead.view(10)
