"""The CLI's own stdin, stdout and stderr: started closed, or a pipe whose reader has gone.

Part of the CLI layer (with cli.py and commands.py, the only modules that print): cli.main
guards the streams before anything else runs, reports an error in one line on stderr
(`say`), and ends with OUTPUT_LOST when the command's output could not be written.
"""

from __future__ import annotations

import io
import os
import select
import sys
from typing import TextIO

OUTPUT_LOST = 120  # as Python's own exit when it cannot flush stdout


class ClosedStdout(io.StringIO):
    """sys.stdout when the command started with fd 1 closed: what is printed is dropped,
    and remembered, so that the command ends with OUTPUT_LOST rather than 0."""

    wrote = False

    def write(self, s: str) -> int:
        self.wrote = self.wrote or bool(s)
        return len(s)


def guard_streams() -> ClosedStdout | None:
    """Started with fd 0, 1 or 2 closed (`2>&-`): /dev/null takes its number, so that no
    file the command opens gets it (a child would write its output there); stderr then
    writes to /dev/null, and stdout to a ClosedStdout, which this returns."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # for the life of the process
    if sys.stdout is None:
        sys.stdout = ClosedStdout()
        return sys.stdout
    return sys.stdout if isinstance(sys.stdout, ClosedStdout) else None


def say(line: str) -> None:
    """A line on stderr; if stderr is a closed pipe too, it is lost, quietly."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _to_devnull(sys.stderr)


def _to_devnull(stream: TextIO | None) -> None:
    """Point the stream's fd at /dev/null: what it still holds is then flushed there, and
    the interpreter's last flush has nothing to complain about."""
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError, AttributeError):
        return
    if fd < 0:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def stdout_broken() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (so an EPIPE was its)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def output_lost(why: str = "a closed pipe") -> int:
    """The command's output could not be written: one line, and OUTPUT_LOST."""
    _to_devnull(sys.stdout)
    say(f"bootenv: error: the output could not be written ({why})")
    return OUTPUT_LOST
