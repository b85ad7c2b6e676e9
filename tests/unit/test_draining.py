"""Draining: a piece gives back what its stream has read, as it reads it."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bootenv.fetchahead as fetchahead_mod
from bootenv.draining import Draining
from bootenv.fetchahead import open_fetched


class _ReadOnly:
    """A source with read() only, as a piece read as it arrives (arriving.py) is."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self._f.read(n)
        return data


@contextlib.contextmanager
def _fetched_piece(data: bytes) -> Iterator[tuple[int, Any]]:
    """A piece in a memfd, as a fetch leaves it, opened as its stream opens it."""
    fd = os.memfd_create("piece")
    try:
        fetchahead_mod.write_all(fd, data)
        fetched = fetchahead_mod._fetched(fd)
        with open_fetched(fetched.path, fetched.ino, fetched.dev) as f:
            yield fd, f
    finally:
        os.close(fd)


@pytest.mark.parametrize("into", [True, False])
def test_a_piece_gives_back_what_its_stream_has_read(into: bool) -> None:
    data = random.Random(7).randbytes(6 << 20)
    with _fetched_piece(data) as (fd, f):
        src = Draining.of(f if into else _ReadOnly(f), f.fileno())
        assert hasattr(src, "readinto") == into
        got = bytearray()
        while len(got) < 5 << 20:
            if into:
                buf = bytearray(512 << 10)
                got += buf[: src.readinto(buf)]  # type: ignore[attr-defined]
            else:
                got += src.read(512 << 10)
        held = os.fstat(fd).st_blocks * 512
        assert held <= 2 << 20, held  # what is read is gone: 1 MiB and what is left
        assert os.fstat(fd).st_size == len(data)  # the piece keeps its size
        while part := src.read(1 << 20):
            got += part
    assert bytes(got) == data


def test_a_piece_that_cannot_be_freed_is_read_whole(tmp_path: Path) -> None:
    data = random.Random(8).randbytes(3 << 20)
    piece = tmp_path / "piece"
    piece.write_bytes(data)
    with open(piece, "rb") as f:  # read-only: fallocate refuses (EBADF)
        src = Draining.of(f, f.fileno())
        got = b"".join(iter(lambda: src.read(300_000), b""))
    assert got == data
    assert piece.stat().st_blocks * 512 >= len(data)  # nothing was punched out


def test_a_closed_draining_punches_nothing_more() -> None:
    """Closed before its file is (a read-ahead thread may still be in a read): a read
    that returns afterwards frees nothing, since the fd number may be another file's."""
    data = random.Random(9).randbytes(4 << 20)
    with _fetched_piece(data) as (fd, f):
        src = Draining.of(f, f.fileno())
        got = src.read(3 << 19)  # 1.5 MiB: the first MiB goes
        held = os.fstat(fd).st_blocks
        assert held * 512 <= len(data) - (1 << 20)
        src.close()
        got += src.read(-1)  # the rest, read after the close
        assert os.fstat(fd).st_blocks == held  # nothing more punched
    assert got == data
