"""A static file server on 127.0.0.1 with Range support and bandwidth caps.

It emulates real HTTP servers and WANs: a cap per connection (e.g. 50 MB/s) and/or a
cap for the whole host shared by all connections (e.g. 1 Gb/s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bootenv.serve import on_thread

CHUNK = 64 << 10


# How far behind its schedule a sender may be and still catch up: a piece is sent after
# the one before it, so each reservation comes a little after that one's deadline (the
# oversleep, the write). Counting from then instead lost 20-30% of a 1 Gb/s cap at 64 KiB
# pieces (0.5 ms each). Idle longer than this is lost, as a link's idle time is.
SLACK = 0.005


class Bucket:
    """A rate limit of `rate` bytes per second (None for unlimited), shared by whoever
    takes from it: a piece of n bytes may go once n / rate seconds have passed since the
    last piece could, so every piece pays for itself before it is sent (the last of a
    response too); time left idle (beyond SLACK) is not saved up as a burst."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next = time.monotonic()  # when the bytes taken so far have been paid for

    def reserve(self, n: int) -> float:
        """Charge `n` bytes; return when (time.monotonic()) they may be sent."""
        if self.rate is None:
            return 0.0
        with self.lock:
            self.next = max(time.monotonic() - SLACK, self.next) + n / self.rate
            return self.next


def wait_until(deadline: float) -> None:
    wait = deadline - time.monotonic()
    if wait > 0:
        time.sleep(wait)


@contextmanager
def serve(root: Path, *, per_connection: float | None = None, per_host: float | None = None) -> Iterator[str]:
    host_bucket = Bucket(per_host)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # TCP_NODELAY, as nginx and `bootenv serve` have it

        def setup(self) -> None:
            super().setup()
            # One bucket per TCP connection, for every request it carries (a layout's
            # stream keeps its connection for all its range requests), as a server's or
            # a WAN's per-connection limit is.
            self.conn_bucket = Bucket(per_connection)

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = (root / self.path.lstrip("/")).resolve()
            if root.resolve() not in path.parents or not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start = int(a)
                end = int(b) if b else size - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        break
                    # Both caps at once: the piece goes when both have been paid.
                    wait_until(max(self.conn_bucket.reserve(len(data)), host_bucket.reserve(len(data))))
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    left -= len(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with on_thread(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
