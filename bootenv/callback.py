"""Post provisioning events to the callback URL (`bootenv serve`'s /callback/<mac>/<assignment>).

The schema is `bootenv.event_schema.parse_event`'s: {"event": KIND, "source": "agent" |
"layout", "step", "status": start|done|failed, "component", "elapsed", "bytes",
"total", "files", "path", "message", "fatal", "data", "time", "seq"}. "time" (when it
was queued) and "seq" (1, 2, ... in this sender) name an event: an attempt made again,
after a timeout or a 502 that came after the server took it, carries the same pair, and
`bootenv serve` takes it once.

Every event is made to fit what `bootenv serve` takes (`fit`), here, for every sender:
a text field (a failure's message, a path) over MAX_TEXT characters is cut, saying so,
a NUL in one becomes the text `\\x00`, and `data` too big for the body is replaced by
a note. Serve refuses the whole of an event that breaks a limit, and the event that
matters most, the final error, is the one that carries a long message.

Posting is best effort, and never holds up provisioning: events are queued, in the
order they are sent from any thread, and a thread of their own posts them over one
HTTP session. A server that is busy for a moment (a rack booting at once: `bootenv
serve` answers 503 past its connection cap) or unreachable is tried again, up to
ATTEMPTS times per event, after its Retry-After (at most RETRY_WAIT) or a backoff. An
event the server answers otherwise (any other 4xx or 5xx), or one that cannot be sent
at all, is not; the warning says why, with the reason the answer gives (`bootenv serve`'s
`{"error": ...}`, at most MAX_ANSWER bytes of it read). Once the server has not answered
any of an event's attempts, the next events are tried once each until it answers again,
so a dead callback costs one failed attempt per event. `close()` waits up to
CLOSE_WAIT, and the attempt under way, for what is queued (the last events, done or
error, matter most), and logs what it could not post.

A 409 that says `"replaced": true` is final for the run: serve answers so to every event
of a run whose machine was assigned again since. The reason is kept (`superseded`), for
the agent to stop at its next step, and what is queued or sent after it is dropped
untried: serve would refuse it all the same. serve's other 409s (the machine has no
record any more, as after serve was started on an empty --state; a URL that names no
assignment, as an agent run by hand sends for an assigned machine) refuse that event
only: the run is not told to stop, for nobody asked it to.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

from bootenv.log import printable

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # per attempt
ATTEMPTS = 4  # per event, while the callback is reachable
RETRY_WAIT = 5.0  # at most between two attempts; a longer Retry-After is cut to it
CLOSE_WAIT = 15.0  # for the queued events, once provisioning is done (and the last attempt)
QUEUE = 10_000  # events waiting at most; past that, new ones are dropped (and counted)
_BUSY = frozenset({429, 502, 503, 504})
# What `bootenv serve` takes (event_schema.MAX_TEXT, serve.MAX_BODY; tests/unit/test_callback.py
# holds them together): characters of one text field, and bytes of one field and of the
# body as JSON, which escapes what is not ASCII (a character can take 12 bytes).
MAX_TEXT = 4000
MAX_TEXT_JSON = 8000
MAX_BODY = 64_000
MAX_ANSWER = 4096  # bytes of an answer's body read, for the reason of a refusal
MAX_REASON = 400  # characters of that reason kept, once escaped
Event = dict[str, Any]


class Callback:
    def __init__(
        self,
        url: str | None,
        source: str,
        *,
        emit: Callable[[Event], None] | None = None,
        deferred: bool = False,
    ) -> None:
        """`deferred`: queue events, and start posting them only at `start()` (or
        `close()`): a process that forks after its first events starts no thread first."""
        self.url = url
        self.source = source  # "agent" or "layout"
        self.emit = emit  # also hand each event to this, at once (tests, JSON output)
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # an event queued, or closing
        self._queue: deque[Event] = deque()  # under the lock, as is every field below
        self._posting: Event | None = None  # the event the thread is posting
        self._thread: threading.Thread | None = None
        self._deferred = deferred
        self._closed = False  # nothing more is queued; the thread ends once all is posted
        self._deadline = float("inf")  # set by close(): past it, what is left is dropped
        self._dropped = 0  # for a full queue, or given up on
        self._seq = 0  # the last event's number
        self._superseded: str | None = None  # serve's reason, once it answered 409
        self._reachable = True  # the thread's own
        self._session: Any = None  # the thread's own

    @property
    def superseded(self) -> str | None:
        """Why serve refused this run's events with a 409 (its reason, or "HTTP 409"
        when it gave none): the machine was assigned again since the run started. None
        while no answer said so; an event's answer comes a little after it is sent."""
        with self._lock:
            return self._superseded

    def post(self, event: str, **fields: Any) -> None:
        body: Event = {"event": event, "source": self.source, "time": time.time()}
        body.update({k: v for k, v in fields.items() if v is not None})
        self.send(body)

    def send(self, body: Event) -> None:
        """Queue an event that already has its "event" key (the source is added)."""
        body = fit({"source": self.source, "time": time.time(), **body})
        with self._lock:
            self._seq += 1
            body["seq"] = self._seq  # its name, with its time: see the module's doc
            log.debug("event %s", body)
            if self.emit is not None:
                self.emit(body)
            if not self.url or self._closed:
                return
            if self._superseded is not None or len(self._queue) >= QUEUE:
                self._dropped += 1
                return
            self._queue.append(body)
            self._wake.notify()
            if not self._deferred:
                self._start()

    def start(self) -> None:
        """Start posting what is queued, and what comes next as it comes."""
        with self._lock:
            self._deferred = False
            if self.url and self._queue:
                self._start()

    def _start(self) -> None:  # under the lock
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="callback", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Post what is queued, waiting up to CLOSE_WAIT (and the attempt under way).
        Closing again does nothing."""
        with self._lock:
            if self._closed or not self.url:
                self._closed = True
                return
            self._closed = True
            if self._queue:
                self._start()
            self._deadline = time.monotonic() + CLOSE_WAIT
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(CLOSE_WAIT + 2 * TIMEOUT)  # an attempt: connecting, then its answer
        with self._lock:
            # And what a thread still posting, or one that died, left.
            lost = self._dropped + len(self._queue) + (self._posting is not None)
        if lost:
            log.warning("%d event(s) could not be posted to %s", lost, self.url)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    break  # closed, and everything posted or dropped
                body = self._posting = self._queue.popleft()
                late = time.monotonic() >= self._deadline
            try:
                if not late:
                    self._deliver(body)
                    continue
            except Exception as exc:  # an event that cannot be sent at all: the next may
                log.warning("could not post %s to %s: %s", body.get("event"), self.url, exc)
            finally:
                with self._lock:
                    self._posting = None
            self._drop()
        if self._session is not None:
            self._session.close()

    def _drop(self) -> None:
        with self._lock:
            self._dropped += 1

    def _deliver(self, body: Event) -> None:
        """Post one event, trying again while the server is busy or does not answer;
        raise what makes it impossible to send (it is then dropped)."""
        import requests

        attempts = ATTEMPTS if self._reachable else 1
        answered = False
        code, reason, replaced = 0, "", False
        for attempt in range(1, attempts + 1):
            wait = 0.5 * 2 ** (attempt - 1)
            if self._session is None:
                self._session = requests.Session()
            try:
                # Streamed, so that no more of the answer is read than MAX_ANSWER.
                answer = self._session.post(self.url, json=body, timeout=TIMEOUT, stream=True)
            except requests.exceptions.SSLError:
                raise  # the same every time: it is not a busy server
            except (requests.ConnectionError, requests.Timeout) as exc:
                why, busy = str(exc), True
            else:
                answered, code = True, answer.status_code
                content = read_answer(answer)
                if code < 400:
                    self._reachable = True
                    return
                reason = refusal_reason(content)
                replaced = code == HTTPStatus.CONFLICT and run_replaced(content)
                why, busy = f"HTTP {code}" + (f": {reason}" if reason else ""), code in _BUSY
                wait = retry_after(answer.headers.get("Retry-After"), wait)
            wait = min(wait, RETRY_WAIT, self._deadline - time.monotonic())
            if not busy or attempt == attempts or wait < 0:
                break  # refused for what it is, or out of attempts or time
            time.sleep(wait)
        self._reachable = answered  # one that never answered gets one attempt per event
        self._drop()
        if replaced:
            self._supersede(reason or why)
            why += "; this run's assignment was replaced: its next events are not posted"
        log.warning("could not post %s to %s: %s", body.get("event"), self.url, why)

    def _supersede(self, reason: str) -> None:
        with self._lock:
            if self._superseded is None:
                self._superseded = reason
            self._dropped += len(self._queue)
            self._queue.clear()

    @contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[None]:
        """Post start, then done (with the elapsed time) or failed (with the error)."""
        self.post("step", step=name, status="start", **fields)
        start = time.monotonic()
        try:
            yield
        except BaseException as exc:
            message = str(exc) or type(exc).__name__  # cut to fit by `send`
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


def fit(body: Event) -> Event:
    """`body` as `bootenv serve` takes it (see the module's doc). The console and the
    log have the whole message."""
    out = {k: _text(v) if isinstance(v, str) else v for k, v in body.items()}
    if "data" in out:
        size = len(json.dumps({**out, "seq": 0}, default=str))  # what JSON cannot hold fails in _run
        if size > MAX_BODY:
            out["data"] = {"cut": f"data left out: the event was {size} bytes, over {MAX_BODY}"}
    return out


def _text(value: str) -> str:
    value = value.replace("\x00", "\\x00")
    if len(value) <= MAX_TEXT and len(json.dumps(value)) <= MAX_TEXT_JSON:
        return value
    tail = f" [cut: {len(value)} characters]"
    keep = MAX_TEXT - len(tail)
    while len(json.dumps(value[:keep])) > MAX_TEXT_JSON - len(tail):
        keep = keep * 3 // 4
    return value[:keep] + tail


def read_answer(answer: Any) -> bytes:
    """Up to MAX_ANSWER bytes of a streamed `requests` answer's body, which is then
    closed: a body read to its end leaves the connection to the next event, a longer
    one (or one that breaks off) closes it."""
    import requests

    got = b""
    try:
        for chunk in answer.iter_content(1024):
            got += chunk
            if len(got) > MAX_ANSWER:
                break
    except (requests.RequestException, OSError):
        pass  # the status is the answer; its body is only the reason
    finally:
        answer.close()
    return got[:MAX_ANSWER]


def refusal_reason(body: bytes) -> str:
    """The reason a JSON answer gives, as `bootenv serve` does (`{"error": REASON}`), as
    one printable line of at most MAX_REASON characters; "" for any other body."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or cut at MAX_ANSWER
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, str):
        return ""
    reason = printable(error.strip())
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 6] + " [cut]"
    return reason


def run_replaced(body: bytes) -> bool:
    """Whether a 409's answer says this run's assignment was replaced (`bootenv serve`'s
    `"replaced": true`: the machine was assigned again). Its other 409s (no record any
    more, a URL that names no assignment) only refuse the event: the run goes on."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("replaced") is True


def retry_after(header: str | None, default: float) -> float:
    """Seconds a Retry-After header asks for (its delay form; a date, or nonsense, gives
    `default`)."""
    try:
        return max(0.0, float(header)) if header is not None else default
    except ValueError:
        return default
