"""Inflater: one decompressor and input buffer reused from piece to piece, same bytes out."""

from __future__ import annotations

import io
import random
import threading

import pytest
import zstandard

from bootenv import inflate, prefetch, stream
from bootenv.inflate import Inflater
from bootenv.manifest import Blob, Component
from tests.hostile.kit import RefusingWriter, f, tar_bytes


def _frames(*parts: bytes) -> bytes:
    """Each part its own zstd frame, as capture cuts a component into chunks."""
    cctx = zstandard.ZstdCompressor(level=3)
    return b"".join(cctx.compress(p) for p in parts)


class ReadOnly:
    """A source with read() and no readinto(): zstd is given what read() returns."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(n)


class Counting(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.readintos = 0

    def readinto(self, buf: object, /) -> int:  # type: ignore[override]
        self.readintos += 1
        return super().readinto(buf)  # type: ignore[arg-type]


def _decompress(inf: Inflater, src: object, step: int) -> bytes:
    out = []
    with inf.reader(src) as z:  # type: ignore[arg-type]
        while chunk := z.read(step):
            out.append(chunk)
    return b"".join(out)


def test_one_inflater_gives_every_piece_back_exactly() -> None:
    rng = random.Random(5)
    inf = Inflater()
    for i in range(6):
        # Incompressible and compressible parts, several frames, more than one read of
        # input (READ) each: the reused buffer is refilled under zstd many times.
        parts = [rng.randbytes(rng.randrange(1, 3 << 20)), b"text %d " % i * rng.randrange(1, 400_000)]
        blob = _frames(*parts)
        src: object = Counting(blob) if i % 2 else ReadOnly(blob)
        assert _decompress(inf, src, rng.randrange(1, 1 << 20)) == b"".join(parts)
        if isinstance(src, Counting):
            assert src.readintos >= len(blob) // inflate.READ  # read into the buffer, not read()


def test_a_corrupt_piece_fails_and_the_next_one_still_decompresses() -> None:
    inf = Inflater()
    good = _frames(b"a" * 100_000)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(zstandard.ZstdError):
        _decompress(inf, io.BytesIO(bytes(bad)), 4096)
    assert _decompress(inf, io.BytesIO(good), 4096) == b"a" * 100_000


def test_idle_inflaters_are_reused_and_at_most_keep_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflate, "_idle", [])
    first = inflate.take()
    inflate.give_back(first)
    assert inflate.take() is first  # reused, not made again
    many = [inflate.take() for _ in range(inflate.KEEP + 3)]
    for inf in many:
        inflate.give_back(inf)
    assert len(inflate._idle) == inflate.KEEP


class _Stalling(io.BytesIO):
    """Gives its first two reads, then blocks until released: a read that hangs."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.release = threading.Event()
        self.calls = 0

    def readinto(self, buf: object, /) -> int:  # type: ignore[override]
        self.calls += 1
        if self.calls > 2:  # the first block decompressed needs a little more than one read
            self.release.wait(10)
        return super().readinto(buf)  # type: ignore[arg-type]


def test_an_inflater_a_stuck_read_ahead_thread_still_uses_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inflate, "_idle", [])
    monkeypatch.setattr(prefetch, "JOIN_TIMEOUT", 0.2)
    tar = tar_bytes([f("opt/a", random.Random(4).randbytes(3 << 20)), f("opt/b", "b")])
    blob = zstandard.ZstdCompressor(level=1).compress(tar)
    comp = Component("c", Blob("x.tar.zst", "0" * 64, len(blob), len(tar)), (), (), 2, (), ())
    src = _Stalling(blob)
    try:
        with pytest.raises(OSError, match="No space left"):
            stream._lay_out(comp, 0, src, RefusingWriter(), partial=False)  # type: ignore[arg-type]
        assert inflate._idle == []  # its thread is still in a read through it
    finally:
        src.release.set()
    for thread in threading.enumerate():
        if thread.name == "prefetch":
            thread.join(10)  # its read returns, and it goes on with the reader it had
            assert not thread.is_alive()
    # A piece that ends normally gives its inflater back for the next.
    with pytest.raises(OSError, match="No space left"):
        stream._lay_out(comp, 0, io.BytesIO(blob), RefusingWriter(), partial=False)  # type: ignore[arg-type]
    assert len(inflate._idle) == 1
