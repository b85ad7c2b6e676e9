"""A requests session that tells a reader which socket its request is on.

A reader aborted from another thread shuts its socket down, so that a read blocked on
the network ends at once (bootenv/httpreader.py). The response's connection gives that
socket only once the server's headers are in: a request still waiting for them
would wait for its timeout. This session's connections report their socket to the
`Watcher` of the thread that sends the request: a new connection once it is made, a
kept-alive one as the request goes out, directly or through an HTTP proxy (`http_proxy`,
`https_proxy`: the socket is then the one to the proxy). (A connection being made is not
cut short: it ends at its timeout. A SOCKS proxy's connections are requests' own, and
report nothing.)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, Protocol


class Watcher(Protocol):
    def watch(self, sock: socket.socket) -> None:
        """The socket this thread's request is on (a plain socket, also under TLS)."""


_current = threading.local()


@contextmanager
def watched(watcher: Watcher) -> Iterator[None]:
    """Report the sockets of the requests this thread sends meanwhile to `watcher`."""
    _current.watcher = watcher
    try:
        yield
    finally:
        _current.watcher = None


def _report(sock: object) -> None:
    watcher: Watcher | None = getattr(_current, "watcher", None)
    # TLS inside TLS (an https:// proxy) is urllib3's SSLTransport over the proxy's socket.
    sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)
    if watcher is not None and isinstance(sock, socket.socket):
        watcher.watch(sock)


@cache
def _pool_classes() -> dict[str, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Reporting:
        sock: object

        def _new_conn(self) -> Any:
            sock = super()._new_conn()  # type: ignore[misc]
            _report(sock)
            return sock

        def request(self, *args: Any, **kwargs: Any) -> Any:
            _report(self.sock)  # a kept-alive connection (a new one has none yet)
            return super().request(*args, **kwargs)  # type: ignore[misc]

    class Conn(Reporting, HTTPConnection):  # type: ignore[misc]
        pass

    class TLSConn(Reporting, HTTPSConnection):  # type: ignore[misc]
        pass

    class Pool(HTTPConnectionPool):  # type: ignore[misc]
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):  # type: ignore[misc]
        ConnectionCls = TLSConn

    return {"http": Pool, "https": TLSPool}


@cache
def _adapter_class() -> type:
    from requests.adapters import HTTPAdapter
    from urllib3.poolmanager import ProxyManager

    class Adapter(HTTPAdapter):  # type: ignore[misc]
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = _pool_classes()

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if isinstance(manager, ProxyManager):  # HTTP(S) proxies; SOCKS keeps its own
                manager.pool_classes_by_scheme = _pool_classes()
            return manager

    return Adapter


def new_session() -> Any:
    """A requests.Session whose connections (direct, or through an HTTP proxy) report
    their sockets."""
    import requests

    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, _adapter_class()())
    return session
