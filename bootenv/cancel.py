"""Stop two sides of one job together: capture packs the components on a thread while
it builds the OS image, and a failure on either side (or Ctrl-C, or SIGTERM) stops the
other at once, not once it has finished its own work."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bootenv.errors import FatalError
from bootenv.run import Stream


class CancelledError(FatalError):
    """This side stopped because the other one failed: that failure is the one to report."""


class Cancel:
    """A flag either side sets with its failure; it kills the commands that are running
    on the other side, which checks the flag between its steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = threading.Event()
        self._running: list[subprocess.Popen[bytes]] = []
        self.cause: BaseException | None = None  # the first failure

    def set(self, cause: BaseException) -> None:
        with self._lock:
            if self.cause is None:
                self.cause = cause
            self._set.set()
            for proc in self._running:
                # Only the signal: the side that started it waits for it (and reports it).
                if proc.poll() is None:
                    proc.kill()

    def check(self) -> None:
        """Raise CancelledError if the other side has failed."""
        if self._set.is_set():
            raise CancelledError("stopped: the capture failed elsewhere")

    @contextmanager
    def running(self, stream: Stream) -> Iterator[Stream]:
        """`stream`, killed if the flag is set while the block runs; killed as well if the
        block fails (nobody will wait for it then)."""
        with self._lock:
            self._running.append(stream.popen)
            if self._set.is_set():
                stream.popen.kill()
        try:
            yield stream
        except BaseException:
            stream.kill()
            raise
        finally:
            with self._lock:
                self._running.remove(stream.popen)
