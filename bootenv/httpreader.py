"""One URL read forward, resuming where a dropped connection cut it off (HttpReader).

A reader retries with Range requests from the exact byte reached, with bounded retries
and exponential backoff (RetryPolicy), holds a server to the length it was told (the
manifest's, else the server's own), and can be aborted from another thread. The image's
HTTP source (source.py) reads every file through it. A 404 is a MissingError, which the
source of a directory raises for a missing file too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass

from bootenv.errors import FatalError, RetryableError, UserError, VerificationError
from bootenv.httpsession import watched

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class ReadAbortedError(FatalError):
    """A read was aborted from another thread: nobody wants the bytes any more."""


class MissingError(UserError):
    """A file the image should hold is not there (no such file, or HTTP 404)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff: float = 0.5  # seconds, doubled after each failure
    max_backoff: float = 8.0
    timeout: float = 30.0  # connect and read timeout

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff * (2**attempt), self.max_backoff))


class HttpReader:
    """A forward-only reader of one URL that resumes from where it was cut off.

    A dropped connection, a stall longer than the timeout or a 5xx answer is retried
    with a Range request from the exact byte offset reached, so whatever consumes the
    stream (a decompressor) never notices. Failures are counted per lack of progress:
    `policy.attempts` failures in a row without a single new byte give up with a
    RetryableError. A length that disagrees with the manifest is fatal.
    """

    def __init__(
        self, session: object, url: str, size: int | None, policy: RetryPolicy, *, start: int | None = None
    ) -> None:
        self.session = session
        self.url = url
        self.size = size  # bytes wanted from `start` (None: to the end)
        self._sized_by = "the manifest"  # where the size came from, for the errors
        self.policy = policy
        self.window = start is not None  # a chunk of the URL, not all of it
        self.start = start or 0  # first byte of the URL this reader covers
        self.pos = 0  # bytes read, from `start`
        self._bounded = True  # the response ends where we do (else stop reading at `size`)
        self._probed = False  # read past the size once (_probe_end)
        self.resumes = 0  # connections after the first, for the log and the tests
        self._resp: object | None = None
        self._failures = 0
        self._skip = 0  # bytes to discard: the server ignored our Range request
        self._aborted = threading.Event()
        self._lock = threading.Lock()  # between abort() and the reading thread's socket
        self._sock: socket.socket | None = None  # the current request's, once it has one

    def _connect(self) -> None:
        import requests

        first = self.start + self.pos
        headers = {}
        if self.window and self.size is not None:
            headers["Range"] = f"bytes={first}-{self.start + self.size - 1}"
        elif first:
            headers["Range"] = f"bytes={first}-"
        try:
            with watched(self):
                resp = self.session.get(self.url, headers=headers, stream=True, timeout=self.policy.timeout)  # type: ignore[attr-defined]
        except _permanent_errors() as exc:  # trying again would follow the same redirects
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"cannot fetch {self.url}: {type(exc).__name__}: {reason}"[:500]) from exc
        except requests.RequestException as exc:
            raise RetryableError(f"cannot fetch {self.url}: {type(exc).__name__}") from exc
        try:
            self._check(resp)
        except BaseException:
            resp.close()
            raise
        with self._lock:
            # From now on the response knows its connection, until urllib3 gives it back
            # to the pool (its body read): then another reader may have that socket.
            self._sock = None
            self._resp = resp

    def _check(self, resp: object) -> None:
        status: int = resp.status_code  # type: ignore[attr-defined]
        headers = resp.headers  # type: ignore[attr-defined]
        if status == 404:
            raise MissingError(f"{self.url} not found (404)")
        if status >= 500 or status in (408, 429):
            raise RetryableError(f"{self.url}: HTTP {status}")
        if status == 416 and self.size is not None:
            raise VerificationError(f"{self.url} is shorter than {self._sized_by} says ({self.size} bytes)")
        first = self.start + self.pos
        if status not in (200, 206) or (status == 206 and not (first or self.window)):
            raise UserError(f"{self.url}: unexpected HTTP {status}")
        if headers.get("Content-Encoding", "identity") != "identity":
            raise VerificationError(f"{self.url}: server re-encoded the blob ({headers['Content-Encoding']})")
        start = 0
        if status == 206:
            start = _range_start(headers.get("Content-Range", ""))
            if start != first:
                raise VerificationError(f"{self.url}: asked for byte {first}, server sent from {start}")
        # A server without Range support restarts from 0; skip what we already have.
        self._skip = first - start
        length = headers.get("Content-Length")
        # Each answer anew (a resume is another): one that ignored a chunk's range goes
        # on past the chunk by design, length or not, and is not probed (_probe_end).
        self._bounded = not (self.window and status == 200)
        if self.size is None and length is not None and not self.window:
            # No size from a manifest (the manifest itself, its signature): the server's
            # is held to instead, so a body cut short is resumed, not taken as whole.
            self.size = _content_length(self.url, length) + start - self.start
            self._sized_by = "its first answer"
        if self.size is None or length is None:
            return
        end, want = _content_length(self.url, length) + start, self.start + self.size
        # A whole blob must be exactly as long as the manifest says; for a chunk, a
        # server that ignored the range sends more, which we stop reading.
        self._bounded = end == want
        if end < want or (end > want and not self.window):
            raise VerificationError(f"{self.url}: server says {end} bytes, {self._sized_by} says {want}")

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        if self.size is not None and self.pos >= self.size:
            self._probe_end()
            return b""
        while True:
            self._check_aborted()
            try:
                if self._resp is None:
                    self._connect()
                    self._check_aborted()  # aborted while connecting: there was no socket to shut
                data = self._read_raw(n)
                self._check_aborted()  # what arrived as it was aborted: nobody wants it
            except (RetryableError, OSError, _urllib3_errors()) as exc:
                self._drop()
                self._retry_or_raise(exc)
                continue
            if data or self.size is None:
                self.pos += len(data)
                if data:
                    self._failures = 0
                if self.size is not None and self.pos > self.size:
                    raise VerificationError(f"{self.url} is longer than {self._sized_by} says")
                return data
            # EOF before the expected size: the connection was cut. Resume.
            self._drop()
            self._retry_or_raise(RetryableError(f"{self.url}: connection closed at byte {self.pos}"))

    def _probe_end(self) -> None:
        """At the manifest's size, once: a body that goes on is refused. A server that
        sent a length is held to it as the reading goes (_check, _read_raw's extra
        byte), but one that sent none ends its body by closing, and only a read past
        the size tells. (Past a chunk's end, where the body may go on, nothing is read.)"""
        if self._probed or not self._bounded or self._resp is None:
            return
        self._probed = True
        try:
            extra = self._read_raw(1)
        except (OSError, _urllib3_errors()):
            return  # cut after the last byte wanted: what was read is all there is
        if extra:
            raise VerificationError(f"{self.url} is longer than {self._sized_by} says")

    def _read_raw(self, n: int) -> bytes:
        raw = self._resp.raw  # type: ignore[union-attr]
        while self._skip:
            dropped: bytes = raw.read(min(self._skip, CHUNK))
            if not dropped:
                return b""
            self._skip -= len(dropped)
        if self.size is not None:
            # One extra byte reveals an over-long body, unless the body goes on by design.
            n = min(n, self.size - self.pos + (1 if self._bounded else 0))
        data: bytes = raw.read(n)
        return data

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            self._drop()
            raise ReadAbortedError(f"{self.url}: read aborted at byte {self.pos}")

    def _retry_or_raise(self, exc: BaseException) -> None:
        if self._aborted.is_set():
            raise ReadAbortedError(f"{self.url}: read aborted at byte {self.pos}") from exc
        self._failures += 1
        if self._failures >= self.policy.attempts:
            raise RetryableError(
                f"giving up on {self.url} after {self._failures} attempts at byte {self.pos}: {exc}"
            ) from exc
        delay = self.policy.delay(self._failures - 1)
        log.warning("%s: %s; resuming at byte %d in %.1f s", self.url, exc, self.pos, delay)
        self.resumes += 1
        if backoff_wait(self._aborted, delay):
            raise ReadAbortedError(f"{self.url}: read aborted at byte {self.pos}") from exc

    def watch(self, sock: socket.socket) -> None:
        """The socket the request being sent is on (bootenv/httpsession.py): an abort
        from now on shuts it down, also while the server's headers are awaited."""
        with self._lock:
            self._sock = sock
            if self._aborted.is_set():
                _shut(sock)

    def _drop(self) -> None:
        with self._lock:
            self._sock = None  # back to the pool: another reader may have it next
        if self._resp is not None:
            self._resp.close()  # type: ignore[attr-defined]
            self._resp = None

    def abort(self) -> None:
        """From another thread: end this download now. A read waiting on the network
        returns at once (its connection is shut down), a retry's backoff stops waiting,
        and they and every later read raise ReadAbortedError, without a retry. With
        HttpSource's session, a request still waiting for the server's headers (or an
        HTTP proxy's) ends at once too; with another session, through a SOCKS proxy, or
        while its connection is being made, once they come or at its timeout."""
        with self._lock:
            self._aborted.set()
            sock = self._sock
            if sock is None:
                conn = getattr(getattr(self._resp, "raw", None), "connection", None)
                sock = getattr(conn, "sock", None)
            if isinstance(sock, socket.socket):
                _shut(sock)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> HttpReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would unwrap
        # the TLS layer under the reading thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def backoff_wait(stop: threading.Event, seconds: float) -> bool:
    """Wait `seconds` before a retry, or until `stop` is set; whether it was."""
    return stop.wait(seconds)


def _content_length(url: str, value: str) -> int:
    """A Content-Length header's value. It may be repeated (`112, 112`: a list of equal
    values is valid, RFC 7230 3.3.2); anything else is the server's error, which may
    pass (a proxy's), so a RetryableError."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not all(v.isascii() and v.isdigit() and len(v) <= 19 for v in values):
        raise RetryableError(f"{url}: the server sent a malformed Content-Length ({value[:40]!r})")
    return int(values.pop())


def _range_start(content_range: str) -> int:
    """The first byte of `bytes START-END/TOTAL`; -1 if the header is malformed."""
    unit, _, spec = content_range.partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isascii() and first.isdigit() and len(first) <= 19 else -1


def _permanent_errors() -> tuple[type[Exception], ...]:
    """What requests raises for a URL that can never be fetched as it is: a redirect
    loop, a redirect to a scheme other than http(s), a URL (or Location) it cannot parse
    (requests' InvalidURL, or urllib's own ValueError: `Location: http://[::1/x`)."""
    from requests.exceptions import InvalidSchema, InvalidURL, MissingSchema, TooManyRedirects

    return (TooManyRedirects, InvalidSchema, MissingSchema, InvalidURL, ValueError)


def _urllib3_errors() -> type[Exception]:
    from urllib3.exceptions import HTTPError

    err: type[Exception] = HTTPError
    return err
