"""Shared pieces of the fault-injection suite: synthetic images, a restartable server.

Images are built in Python (tests/hostile/kit.py) from a seeded RNG, so every run lays
out the same bytes. Layouts read them over HTTP from tests/unit/httpfault.py's
FaultServer, with a fast RetryPolicy so that retries and backoff take milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from pathlib import Path
from typing import Any

from bootenv.httpreader import RetryPolicy
from bootenv.layout import LayoutConfig, LayoutResult, layout
from tests.hostile.kit import Comp, d, f, make_image, snapshot, sym
from tests.unit.httpfault import FaultServer, _Server

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.04, timeout=5.0)


class Recorder:
    """An activator that records what it was asked to activate."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, list[str]]] = []

    def __call__(self, root: Path, units: list[str]) -> list[str]:
        self.calls.append((root, list(units)))
        return ["recorded"]


def status(pkg: str) -> str:
    return f"Package: {pkg}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0\n"


def component(name: str, seed: int, files: int = 60) -> Comp:
    """Dirs, files of random and compressible bytes, modes, symlinks and a shared config."""
    rng = random.Random(f"{name}-{seed}")
    members = [d("etc"), d("etc/conf.d"), f("etc/conf.d/shared.conf", f"# {name}\n")]
    members += [d("opt"), d(f"opt/{name}"), d(f"opt/{name}/sub", mode=0o750)]
    for i in range(files):
        size = rng.randrange(0, 12_000)
        body = rng.randbytes(size // 2) + (b"%s line %d\n" % (name.encode(), i)) * (size // 24)
        where = f"opt/{name}/sub" if i % 4 == 0 else f"opt/{name}"
        members.append(f(f"{where}/f{i:03d}", body, mode=(0o640, 0o755, 0o4755, 0o600)[i % 4]))
        if i % 9 == 0:
            members.append(sym(f"opt/{name}/l{i:03d}", f"f{i:03d}"))
    return Comp(
        name, members, units=(f"{name}.service",), packages=(f"pkg-{name}",), status=status(f"pkg-{name}")
    )


def build_image(directory: Path, names: tuple[str, ...] = ("good", "bad"), seed: int = 7) -> Path:
    return make_image(directory, [component(n, seed) for n in names])


def blob_of(image: Path, name: str) -> tuple[str, int]:
    """(file, size) of a component's blob."""
    doc = json.loads((image / "manifest.json").read_text())
    data = next(c["data"] for c in doc["components"] if c["name"] == name)
    return str(data["file"]), int(data["size"])


def run_layout(
    image: str, root: Path, components: tuple[str, ...] | str = "all", streams: int = 1
) -> tuple[LayoutResult, Recorder]:
    root.mkdir(parents=True, exist_ok=True)
    act = Recorder()
    res = layout(LayoutConfig(image, components, root, streams=streams), activator=act)
    return res, act


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    return snapshot(root)


class RestartableServer(FaultServer):
    """A FaultServer bound to a chosen port, whose stop() also cuts open connections.

    Stopping one and starting another on the same port is a server restart as a client
    sees it: the stream in flight is cut and, for a moment, connections are refused.
    """

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(root)
        handler = self.httpd.RequestHandlerClass
        self.httpd.server_close()
        self.tracking = _ConnTracking(("127.0.0.1", port), handler)
        self.httpd = self.tracking
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> RestartableServer:
        super().__enter__()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.tracking.cut_all()
        self._thread.join()


class _ConnTracking(_Server):
    """The fault server's HTTP server, remembering its connections so stop() can cut them."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.conns: list[socket.socket] = []
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self.conns.append(request)
        super().process_request(request, client_address)

    def cut_all(self) -> None:
        with self._conns_lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):  # already closed by its handler
                    conn.shutdown(socket.SHUT_RDWR)
