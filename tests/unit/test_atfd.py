"""The fd helpers a layout reaches and makes its entries with: the table of fds a stream
reserves before it has threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootenv import atfd
from bootenv.extract import MAX_OPEN_DIRS


def _fd_table_size() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("FDSize:")).split()[1])


def test_a_stream_grows_its_fd_table_once_before_it_has_threads() -> None:
    """A forked process starts with a small table (64 fds here, as a stream did); one call
    grows it to FD_TABLE, so opening MAX_OPEN_DIRS directories later never grows it again
    (a growth under threads waits for an RCU grace period). The table is the kernel's,
    read from /proc in a forked child."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < atfd.FD_TABLE:
        pytest.skip("the soft limit on open files is under FD_TABLE here: nothing to reserve")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports, and never returns into pytest
        try:
            before = _fd_table_size()
            atfd.reserve_fd_table()
            after = _fd_table_size()
            held = [os.open("/", os.O_RDONLY) for _ in range(MAX_OPEN_DIRS + 20)]
            os.write(write, f"{before} {after} {_fd_table_size()} {len(held)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as r:
        report = r.read()
    os.waitpid(pid, 0)
    before, after, later, _ = map(int, report.split())
    assert before < atfd.FD_TABLE <= MAX_OPEN_DIRS * 2
    assert after == later == atfd.FD_TABLE


def test_the_reservation_stays_under_the_fd_limit_touches_no_fd_and_leaks_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a soft limit of 32 fds it asks for the lowest free fd from 31, so an fd the
    process holds there is never replaced; where even that fails (EMFILE) it goes on.
    Either way it leaves no fd open."""
    import fcntl
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (32, 32))
    held = os.open("/", os.O_RDONLY)
    os.dup2(held, 31)  # an fd this process holds where the reservation would go
    asked: list[int] = []
    real_fcntl = fcntl.fcntl

    def spy(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_DUPFD_CLOEXEC:
            asked.append(arg)
            if len(asked) > 1:
                raise OSError(24, "Too many open files")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", spy)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        atfd.reserve_fd_table()
        atfd.reserve_fd_table()
        assert asked == [31, 31]
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert os.path.samestat(os.fstat(31), os.fstat(held))  # still the one it held
    finally:
        os.close(31)
        os.close(held)
