"""Logging setup, timed steps and progress reporting.

Everything logs through `logging.getLogger(__name__)`; only the CLI prints. A progress
bar is drawn on a terminal, and replaced by a log line every few seconds elsewhere.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger(__name__)


def setup_logging(*, debug: bool = False, stream: TextIO | None = None) -> None:
    """Configure the root logger once, at the CLI edge."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    stream = stream or sys.stderr  # None: started with stderr closed (cli.main opens /dev/null)
    handler = logging.StreamHandler(stream) if stream is not None else logging.NullHandler()
    fmt = "%(asctime)s %(levelname).1s %(name)s: %(message)s" if debug else "%(asctime)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log the start and the duration of a named step."""
    log.info("%s ...", name)
    start = time.monotonic()
    try:
        yield
    except BaseException:
        log.info("%s failed after %.1f s", name, time.monotonic() - start)
        raise
    log.info("%s: done in %.1f s", name, time.monotonic() - start)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def printable(text: str) -> str:
    """`text` as one line a terminal shows as it is: each character that is not
    printable (a control character, a newline, an escape) written as its Python escape,
    and a byte that was not UTF-8 (a path's, decoded with surrogateescape) as `\\xe9`."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return repr(ch)[1:-1]


class Progress:
    """A progress bar on a terminal, a periodic log line otherwise."""

    def __init__(self, label: str, total: int, *, unit: str = "bytes", interval: float = 5.0) -> None:
        self.label = label
        self.total = max(total, 0)
        self.unit = unit
        self.done = 0
        self._interval = interval
        self._start = time.monotonic()
        self._last = 0.0
        tty = sys.stderr is not None and sys.stderr.isatty()  # None: started with stderr closed
        self._tty = tty and logging.getLogger().isEnabledFor(logging.INFO)

    def _fmt(self, n: int) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{n} {self.unit}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < (0.2 if self._tty else self._interval):
            return
        self._last = now
        # A total that is an estimate (a tar stream's size) never shows past 100%.
        pct = min(100.0 * self.done / self.total, 100.0) if self.total else 100.0
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        rate_s = human_bytes(rate) + "/s" if self.unit == "bytes" else f"{rate:.0f} {self.unit}/s"
        if self._tty:
            width = 30
            filled = int(width * min(pct, 100.0) / 100)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {pct:5.1f}% {self._fmt(self.done)} {rate_s}   ")
            sys.stderr.flush()
        else:
            log.info("%s: %.0f%% (%s, %s)", self.label, pct, self._fmt(self.done), rate_s)

    def close(self) -> None:
        if self._tty and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()
