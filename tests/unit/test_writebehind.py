"""WriteBehind: writes in order from recycled buffers, errors raised to the caller."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from bootenv.writebehind import WriteBehind


class Disk:
    """Records each write as (offset, bytes); `fail_at` makes the write at that offset raise."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.fail_at = fail_at
        self.threads: set[str] = set()

    def write(self, buf: memoryview, offset: int) -> None:
        self.threads.add(threading.current_thread().name)
        if offset == self.fail_at:
            raise OSError(f"write at byte {offset} failed")
        self.writes.append((offset, bytes(buf)))


def _pool(n: int, size: int = 16) -> list[memoryview]:
    return [memoryview(bytearray(size)) for _ in range(n)]


def test_every_write_lands_in_order_from_recycled_buffers() -> None:
    disk = Disk()
    with WriteBehind(disk.write, _pool(2)) as behind:
        for i in range(50):  # far more jobs than buffers: each must come back to be reused
            buf = behind.buffer()
            buf[:] = bytes([i]) * 16
            behind.submit(buf, [(0, 4, 100 * i), (8, 8, 100 * i + 50)])  # two slices of one buffer
        behind.finish()
    expected = []
    for i in range(50):
        expected += [(100 * i, bytes([i]) * 4), (100 * i + 50, bytes([i]) * 8)]
    assert disk.writes == expected
    assert disk.threads == {"write-behind"}


def test_a_failed_write_is_raised_and_later_jobs_are_dropped() -> None:
    disk = Disk(fail_at=300)
    pool = _pool(1)
    with WriteBehind(disk.write, pool) as behind:
        with pytest.raises(OSError, match="write at byte 300"):
            for i in range(10):
                buf = behind.buffer()  # with one buffer, this waits for the last job
                behind.submit(buf, [(0, 16, 100 * i)])
        assert [off for off, _ in disk.writes] == [0, 100, 200]
        behind.submit(pool[0], [(0, 16, 900)])  # after the failure: not written
        with pytest.raises(OSError, match="write at byte 300"):
            behind.finish()
    assert [off for off, _ in disk.writes] == [0, 100, 200]


def test_a_failing_caller_still_gets_what_it_submitted_written_before_exit() -> None:
    gate = threading.Event()
    disk = Disk()

    def slow(buf: memoryview, offset: int) -> None:
        gate.wait(30)  # a hang guard: the gate opens once the exit has begun
        disk.write(buf, offset)

    class Held(WriteBehind):
        def __exit__(self, *exc_info: Any) -> None:
            gate.set()  # the writes are held until the caller's failure reaches the exit
            super().__exit__(*exc_info)

    with pytest.raises(RuntimeError), Held(slow, _pool(3)) as behind:
        for i in range(3):
            behind.submit(behind.buffer(), [(0, 16, i)])
        assert disk.writes == []
        raise RuntimeError("the caller's own failure")
    # The exit waited for the thread: all three writes are done, and none runs any more.
    assert [off for off, _ in disk.writes] == [0, 1, 2]
    assert not any(t.name == "write-behind" for t in threading.enumerate())
