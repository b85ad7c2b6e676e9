"""What counts as an http(s) URL, decided once: at the edge, before any request."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit


def split_http_url(text: str) -> SplitResult | None:
    """`text` split, if it is an http(s) URL with a host and a valid port; else None.
    (urlsplit raises on a broken IPv6 host, and `.port` on a port that is not a number
    below 65536: requests would only find out on the first request, and retry it.)"""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        return None
    return parts
