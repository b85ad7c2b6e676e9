"""A fault-injecting HTTP server for tests, bound to 127.0.0.1 on a free port.

It serves a directory with Range support (HTTP/1.1, keep-alive) and, per file name,
can drop the connection at byte X, stall (before the headers, or before byte X), answer
5xx bursts, flip a byte, pretend the file is shorter, lie about Content-Length, or
ignore Range requests. Every request is recorded so that tests can assert how the
client behaved.

    with FaultServer(directory) as srv:
        srv.faults["blob.zst"] = Fault(drops=[1000, 5000])
        fetch(srv.url + "blob.zst")
        assert [r.start for r in srv.requests] == [0, 1000, 5000]
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    """What to do wrong when serving one file. Offsets are absolute file offsets."""

    drops: list[int] = field(default_factory=list)  # each: cut the connection there, once
    drop_always: int | None = None  # cut every response at this offset (a persistent fault)
    stall_at: int | None = None  # pause once before sending this byte ...
    stall_seconds: float = 0.0  # ... for this long
    stall_headers: float = 0.0  # pause once before the response's headers, this long
    errors: int = 0  # answer this many requests with `status` first (-1: forever)
    status: int = 503
    corrupt_at: int | None = None  # flip this byte (every time)
    truncate: int | None = None  # serve only this many bytes, with honest headers
    length_delta: int = 0  # add this to Content-Length (a lie)
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    # Send this many junk bytes after the file, with no Content-Length: the body ends when
    # the server closes the connection (HTTP/1.0 style), so only reading on tells.
    trailing: int = 0


@dataclass(frozen=True)
class Request:
    path: str
    start: int  # first byte asked for (0 without Range)
    status: int


class FaultServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, Fault] = {}
        self.requests: list[Request] = []
        self.stalled = threading.Event()  # set when a stall begins: the client is mid-stream
        # Set when a stall ends and the server sends on: a client that ended before this
        # did not wait out the stall.
        self.resumed = threading.Event()
        self.closing = threading.Event()  # ends a stall: no handler outlives its server for long
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def requests_for(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.path == name]

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


class Buffer(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> bytes: ...


class _Window:
    """The first `n` bytes of a buffer: a file that looks truncated."""

    def __init__(self, data: Buffer, n: int) -> None:
        self.data = data
        self.n = min(n, len(data))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice, /) -> bytes:
        start, stop, _ = key.indices(self.n)
        return self.data[start:stop]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up on a faulty answer is the point of the exercise.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    server_ref: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server_ref
        # As a proxy, the request names the whole URL: http://host/name.
        name = urlsplit(self.path).path.lstrip("/") if "://" in self.path else self.path.lstrip("/")
        fault = srv.faults.get(name, Fault())
        path = srv.root / name
        if "/" in name or not path.is_file():
            return self._status(name, 0, 404)
        match = _RANGE.match(self.headers.get("Range", "") or "")
        start = int(match.group(1)) if match else 0
        if fault.errors:
            if fault.errors > 0:
                fault.errors -= 1
            return self._status(name, start, fault.status)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return self._serve(name, fault, b"", match, start)
            # A mapping, not a read: the gold OS image is hundreds of MB.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return self._serve(name, fault, data, match, start)

    def _serve(self, name: str, fault: Fault, data: Buffer, match: re.Match[str] | None, start: int) -> None:
        if fault.truncate is not None:
            data = _Window(data, fault.truncate)
        if match and fault.ignore_range:
            start = 0
            match = None
        size = len(data)
        if start >= size and match:
            self.server_ref.record(Request(name, start, 416))
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        status = 206 if match else 200
        stop = min(int(match.group(2)) + 1, size) if match and match.group(2) else size
        # Record before answering: a test may look as soon as its client has the answer.
        self.server_ref.record(Request(name, start, status))
        if fault.stall_headers:
            stall, fault.stall_headers = fault.stall_headers, 0.0
            self.server_ref.stalled.set()
            self.server_ref.closing.wait(stall)
            self.server_ref.resumed.set()
        self.send_response(status)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        if fault.trailing:
            self.close_connection = True
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(stop - start + fault.length_delta))
        self.end_headers()
        self._body(data, start, stop, fault)
        if fault.trailing:
            with contextlib.suppress(OSError):
                self.wfile.write(b"\xa5" * fault.trailing)
                self.wfile.flush()

    def _status(self, name: str, start: int, status: int) -> None:
        self.server_ref.record(Request(name, start, status))
        body = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: Buffer, pos: int, end: int, fault: Fault) -> bytes:
        chunk = data[pos:end]
        bad = fault.corrupt_at
        if bad is not None and pos <= bad < end:
            chunk = chunk[: bad - pos] + bytes([chunk[bad - pos] ^ 0xFF]) + chunk[bad - pos + 1 :]
        return chunk

    def _body(self, data: Buffer, start: int, stop: int, fault: Fault) -> None:
        end = stop
        cuts = [d for d in fault.drops if start <= d < stop]
        if fault.drop_always is not None and start <= fault.drop_always < stop:
            cuts.append(fault.drop_always)
        cut = min(cuts, default=None)
        if cut is not None:
            end = cut
            if cut in fault.drops:
                fault.drops.remove(cut)
        pos = start
        try:
            if fault.stall_at is not None and start <= fault.stall_at < end:
                self.wfile.write(self._chunk(data, pos, fault.stall_at, fault))
                self.wfile.flush()
                pos = fault.stall_at
                stall, fault.stall_at = fault.stall_seconds, None
                self.server_ref.stalled.set()
                self.server_ref.closing.wait(stall)
                self.server_ref.resumed.set()
            while pos < end:
                nxt = min(end, pos + (256 << 10))
                self.wfile.write(self._chunk(data, pos, nxt, fault))
                pos = nxt
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if end < stop or fault.length_delta:
            # Cut (or lied): the client must not reuse this connection.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
