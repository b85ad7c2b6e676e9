"""Prefetch: the same bytes, errors raised where they happen, and a prompt close."""

from __future__ import annotations

import io
import random

import pytest

from bootenv.prefetch import Prefetch


class Flaky:
    """A source that gives `good` bytes in small reads, then raises."""

    def __init__(self, good: bytes) -> None:
        self.src = io.BytesIO(good)

    def read(self, n: int = -1, /) -> bytes:
        data = self.src.read(min(n, 777))
        if not data:
            raise OSError("connection reset")
        return data


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
    assert not ahead._thread.is_alive()  # it saw the stop while waiting on the full queue
