"""Post provisioning events to the callback URL (`bootenv serve`'s /callback/<mac>).

The schema is `bootenv.machines.parse_event`'s: {"event": KIND, "source": "agent" |
"layout", "step", "status": start|done|failed, "component", "elapsed", "bytes",
"total", "files", "path", "message", "fatal", "data"}. Posting is best effort: a dead
callback never stops provisioning, it is only logged. Events are posted in order, from
any thread, over one HTTP session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT = 5.0
Event = dict[str, Any]


class Callback:
    def __init__(self, url: str | None, source: str, *, emit: Callable[[Event], None] | None = None) -> None:
        self.url = url
        self.source = source  # "agent" or "layout"
        self.emit = emit  # also hand each event to this (tests, JSON output)
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._session: Any = None

    def post(self, event: str, **fields: Any) -> None:
        body: Event = {"event": event, "source": self.source, "time": time.time()}
        body.update({k: v for k, v in fields.items() if v is not None})
        self.send(body)

    def send(self, body: Event) -> None:
        """Post an event that already has its "event" key (the source is added)."""
        body = {"source": self.source, "time": time.time(), **body}
        with self._lock:
            log.debug("event %s", body)
            if self.emit is not None:
                self.emit(body)
            if not self.url:
                return
            try:
                import requests

                if self._session is None:
                    self._session = requests.Session()
                self._session.post(self.url, json=body, timeout=TIMEOUT).raise_for_status()
            except Exception as exc:  # best effort, by design
                log.warning("could not post %s to %s: %s", body.get("event"), self.url, exc)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    @contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[None]:
        """Post start, then done (with the elapsed time) or failed (with the error)."""
        self.post("step", step=name, status="start", **fields)
        start = time.monotonic()
        try:
            yield
        except BaseException as exc:
            message = str(exc)[:4000] or type(exc).__name__
            self.post(
                "step",
                step=name,
                status="failed",
                elapsed=time.monotonic() - start,
                message=message,
                **fields,
            )
            raise
        elapsed = time.monotonic() - start
        self.timings[name] = elapsed
        self.post("step", step=name, status="done", elapsed=elapsed, **fields)
