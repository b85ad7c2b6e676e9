"""Which accepted connections of a socketserver-based HTTP server have TCP_NODELAY."""

from __future__ import annotations

import socket
import socketserver

import pytest


def connection_options(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """TCP_NODELAY of each connection a server of socketserver's accepts from now on."""
    seen: list[int] = []
    real = socketserver.StreamRequestHandler.setup

    def setup(self: socketserver.StreamRequestHandler) -> None:
        real(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(socketserver.StreamRequestHandler, "setup", setup)
    return seen
