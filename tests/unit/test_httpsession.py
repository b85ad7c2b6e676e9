"""The sockets bootenv's requests session reports to the thread's watcher."""

from __future__ import annotations

import socket

from bootenv import httpsession


class _Seen:
    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def watch(self, sock: socket.socket) -> None:
        self.socks.append(sock)


class _Transport:
    """What urllib3 holds for TLS inside TLS (an https:// proxy): the proxy's socket under it."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_a_socket_and_a_tls_transport_over_one_are_reported_and_nothing_else() -> None:
    seen = _Seen()
    a, b = socket.socketpair()
    try:
        with httpsession.watched(seen):
            httpsession._report(a)
            httpsession._report(_Transport(b))
            httpsession._report(None)  # a connection not made yet
            httpsession._report(_Transport(None))  # type: ignore[arg-type]
        httpsession._report(a)  # outside watched(): nobody to tell
        assert seen.socks == [a, b]
    finally:
        a.close()
        b.close()
