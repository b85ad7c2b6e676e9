"""Bounded connections of a threaded HTTP/1.1 server: what `bootenv serve` does before and
after its endpoints (bootenv/serve.py lists them) answer.

One thread per connection, so a slow client never blocks another; every socket has a
timeout, a request's head and body are bounded in size and in time, and connections are
capped (`CappedServer`, past the cap a 503 at once). `BoundedHandler` reads each request
within those bounds, never takes a body it left unread for the next request, and answers
with text, JSON or an error that names no path of the server's.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import SplitResult, urlsplit

from bootenv.errors import UserError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 60.0  # seconds a client may stay silent mid-request
HEAD_LIMIT = 32 * 1024  # bytes of one request's line and headers (nginx: 4 x 8 KiB)
HEAD_TIMEOUT = 60.0  # seconds to send a request's line and headers, or a callback's body
MAX_CONNECTIONS = 256  # open at once; more get 503 (each holds a thread)
_LENGTH = re.compile(r"[0-9]{1,10}")
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
)


class CappedServer(ThreadingHTTPServer):
    """A thread per connection, up to MAX_CONNECTIONS, each dropped past its deadline."""

    daemon_threads = True
    request_queue_size = 128  # a rack powering on at once
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BoundedHandler]) -> None:
        self.deadlines = _Deadlines()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to MAX_CONNECTIONS; past that, 503 at once."""
        if not self._slots.acquire(blocking=False):
            log.debug("%s: %d connections open, answering 503", client_address, MAX_CONNECTIONS)
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.clear(request)
            self._slots.release()

    def service_actions(self) -> None:
        """Between polls of the listening socket: drop connections past their deadline."""
        self.deadlines.reap()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a layout done with its keep-alive connection, an agent
        that rebooted) is routine, logged at debug level; anything else is a bug, logged
        with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException)):
            log.debug("%s: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)


class _Deadlines:
    """Connections that must finish what they are sending by a time: a client that
    sends its request's head (or a callback's body) a byte at a time would otherwise
    hold its thread for as long as it likes, each byte within the socket's timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}

    def set(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds

    def clear(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, due in self._due.items() if due <= now]
            for sock in late:
                del self._due[sock]
        for sock in late:
            log.debug("dropping a connection that missed its deadline")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns, and it ends


class _HeadReader:
    """A connection's reader that gives each request's line and headers HEAD_LIMIT bytes
    in all (http.server allows 100 headers of 64 KiB each)."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.left = HEAD_LIMIT

    def readline(self, size: int = -1) -> bytes:
        want = self.left + 1 if size < 0 else min(size, self.left + 1)
        line = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request head over {HEAD_LIMIT} bytes")
        return line

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


class BoundedHandler(BaseHTTPRequestHandler):
    """Reads each request within the bounds; a subclass answers it (`AnswerError` for a
    4xx, `_failed` and `_crashed` for a 500)."""

    server: CappedServer
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT
    server_version = "bootenv"
    # TCP_NODELAY, as nginx has it: a keep-alive client asks for chunk after chunk, and
    # with Nagle's algorithm the end of each answer waited for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        self.head = _HeadReader(self.rfile)
        self.rfile = self.head  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self.head.left = HEAD_LIMIT
        self.unread = False
        self.answered = False  # a status line went out: no error answer can follow
        # Set before the request line: an idle keep-alive connection is dropped too.
        self.server.deadlines.set(self.connection, HEAD_TIMEOUT)
        try:
            super().handle_one_request()
        except http.client.LineTooLong:  # the request line alone was over the limit
            self.requestline, self.request_version, self.command = "", "", ""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
        finally:
            self.server.deadlines.clear(self.connection)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.deadlines.clear(self.connection)  # the head is in
        if ok:
            # A body this server does not read (a GET's, or one refused before reading)
            # must not be taken for the next request on the connection.
            self.unread = bool(self.headers.get("Transfer-Encoding")) or bool(
                _lengths(self.headers) - {"", "0"}
            )
        return ok

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answered = True
        super().send_response(code, message)

    def end_headers(self) -> None:
        if self.unread and not self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        super().end_headers()

    def _target(self) -> SplitResult:
        try:
            return urlsplit(self.path)
        except ValueError as exc:  # a broken IPv6 host: http://[x/
            raise AnswerError(HTTPStatus.BAD_REQUEST, f"bad request target: {exc}") from exc

    def _failed(self, exc: UserError | OSError, head: bool) -> None:
        log.error("%s %s: %s", self.command, self.path, exc)  # with the hint: a file's path
        # The client is told what failed, not where: no path of the server's.
        message = exc.message if isinstance(exc, UserError) else exc.strerror or type(exc).__name__
        self._error(message, head)

    def _crashed(self, head: bool) -> None:
        log.exception("%s %s failed", self.command, self.path)
        self._error("internal error (the server's log has it)", head)

    def _error(self, message: str, head: bool) -> None:
        if self.answered:  # mid-answer: all the client can be told is the connection's end
            self.close_connection = True
            return
        self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}, head)

    def _body(self, limit: int) -> object:
        """The request's JSON body, of at most `limit` bytes, framed by its Content-Length."""
        lengths = _lengths(self.headers)
        if len(lengths) > 1:  # which one frames the body? A proxy may have taken the other
            raise AnswerError(HTTPStatus.BAD_REQUEST, "Content-Length headers that differ")
        length = lengths.pop() if lengths else ""
        if self.headers.get("Transfer-Encoding") or not _LENGTH.fullmatch(length):
            raise AnswerError(HTTPStatus.LENGTH_REQUIRED, "a callback needs a Content-Length")
        if int(length) > limit:
            raise AnswerError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        self.server.deadlines.set(self.connection, HEAD_TIMEOUT)
        try:
            data = self.rfile.read(int(length))
        finally:
            self.server.deadlines.clear(self.connection)
        if len(data) < int(length):
            raise ConnectionResetError("the client closed its connection mid-body")
        self.unread = False
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise AnswerError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from exc

    def _text(self, text: str, head: bool = False) -> None:
        self._send(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8", head)

    def _json(self, status: HTTPStatus, body: object, head: bool = False) -> None:
        self._send(status, (json.dumps(body, indent=1) + "\n").encode(), "application/json", head)

    def _send(self, status: HTTPStatus, data: bytes, ctype: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)


def _lengths(headers: Any) -> set[str]:
    """The values of a request's Content-Length headers (one may list several)."""
    return {v.strip() for field in headers.get_all("Content-Length", []) for v in str(field).split(",")}


class AnswerError(Exception):
    """An answer with this status and `{"error": message}` (and `fields`, where its
    handler adds them), not a failure of the server."""

    def __init__(self, status: HTTPStatus, message: str, **fields: object) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields
