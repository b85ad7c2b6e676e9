"""Post provisioning events to the callback URL (`bootenv serve`'s /callback/<mac>).

The schema is `bootenv.machines.parse_event`'s: {"event": KIND, "source": "agent" |
"layout", "step", "status": start|done|failed, "component", "elapsed", "bytes",
"total", "files", "path", "message", "fatal", "data"}. Posting is best effort: a dead
callback never stops provisioning, it is only logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT = 5.0


@dataclass
class Callback:
    url: str | None
    source: str  # "agent" or "layout"
    timings: dict[str, float] = field(default_factory=dict)

    def post(self, event: str, **fields: Any) -> None:
        body = {"event": event, "source": self.source, "time": time.time()}
        body.update({k: v for k, v in fields.items() if v is not None})
        log.debug("event %s", body)
        if not self.url:
            return
        try:
            import requests

            requests.post(self.url, json=body, timeout=TIMEOUT).raise_for_status()
        except Exception as exc:  # best effort, by design
            log.warning("could not post %s to %s: %s", event, self.url, exc)

    @contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[None]:
        """Post start, then done (with the elapsed time) or failed (with the error)."""
        self.post("step", step=name, status="start", **fields)
        start = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.post(
                "step",
                step=name,
                status="failed",
                elapsed=time.monotonic() - start,
                message=str(exc)[:4000] or type(exc).__name__,
                **fields,
            )
            raise
        elapsed = time.monotonic() - start
        self.timings[name] = elapsed
        self.post("step", step=name, status="done", elapsed=elapsed, **fields)
