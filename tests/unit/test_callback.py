"""The callback poster against a real HTTP server on 127.0.0.1: events arrive in order,
never hold up the sender, survive a busy server, and a dead one costs little."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from bootenv import callback, event_schema, serve
from bootenv.callback import Callback, retry_after
from bootenv.cmdline import DiskSelector
from bootenv.disks import DiskInfo, choose_disk
from bootenv.errors import UserError
from bootenv.serve import ServeConfig, running
from tests.conftest import serving
from tests.serveimage import make_image

# (event, request no.) -> (status, headers[, body])
Answer = Callable[[dict[str, object], int], tuple[int, dict[str, str]] | tuple[int, dict[str, str], bytes]]


@contextmanager
def server(
    answer: Answer, delay: float = 0.0, connections: list[int] | None = None
) -> Iterator[tuple[str, list[dict[str, object]], list[str]]]:
    """(URL, the events it took, in order, and every event it was sent, taken or not).
    `connections` counts the connections it accepted."""
    took: list[dict[str, object]] = []
    sent: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            if connections is not None:
                connections.append(1)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(delay)
            sent.append(str(body["event"]))
            code, headers, *rest = answer(body, len(sent))
            content = rest[0] if rest else b""
            if code < 400:
                took.append(body)
            self.send_response(code)
            for k, v in {"Content-Length": str(len(content)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            with suppress(ConnectionError):  # a client that read what it wanted, and left
                self.wfile.write(content)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield f"{url}/callback/x", took, sent


def ok(body: dict[str, object], n: int) -> tuple[int, dict[str, str]]:
    return 204, {}


@pytest.fixture(autouse=True)
def _short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(callback, "RETRY_WAIT", 0.05)


def test_events_arrive_in_order_and_never_hold_up_the_sender() -> None:
    """The server holds every answer until the sender has queued all five events: a
    sender that waited for an answer would never get there."""
    release = threading.Event()

    def held(body: dict[str, object], n: int) -> tuple[int, dict[str, str]]:
        release.wait(30)
        return 204, {}

    with server(held) as (url, took, _):
        cb = Callback(url, "layout")

        def send_all() -> None:
            for i in range(5):
                cb.post("progress", files=i)

        sender = threading.Thread(target=send_all)
        sender.start()
        sender.join(10)
        queued = not sender.is_alive()
        release.set()
        cb.close()  # waits for them
        assert queued, "the sender waited for the server"
        assert [e["files"] for e in took] == [0, 1, 2, 3, 4]
        assert {e["source"] for e in took} == {"layout"}


def busy_for(k: int) -> Answer:
    """503 with Retry-After, as `bootenv serve` answers past its connection cap, to the
    first `k` requests; then 204."""
    return lambda body, n: (503, {"Retry-After": "0"}) if n <= k else (204, {})


@pytest.mark.parametrize(
    ("busy", "sent", "took"),
    [
        (2, ["start"] * 3 + ["done"], ["start", "done"]),
        # Busy for longer than an event's attempts: that one is lost. The server did
        # answer, so it is not taken for dead: the next event gets every attempt too.
        (callback.ATTEMPTS + 1, ["start"] * callback.ATTEMPTS + ["done"] * 2, ["done"]),
    ],
)
def test_a_busy_server_is_tried_again(busy: int, sent: list[str], took: list[str]) -> None:
    with server(busy_for(busy)) as (url, got, tried):
        cb = Callback(url, "agent")
        cb.post("start")
        cb.post("done")
        cb.close()
    assert tried == sent
    assert [e["event"] for e in got] == took


def test_an_event_refused_for_what_it_is_is_not_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    def refuse_bad(body: dict[str, object], n: int) -> tuple[int, dict[str, str]]:
        return (400, {}) if body["event"] == "bad" else (204, {})

    with server(refuse_bad) as (url, took, sent), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent")
        cb.post("bad")
        cb.post("good")
        cb.close()
        cb.close()  # again: nothing more to wait for or to report
        cb.post("late")  # after close: dropped quietly
    assert sent == ["bad", "good"] and [e["event"] for e in took] == ["good"]
    assert f"could not post bad to {url}: HTTP 400" in caplog.text
    assert caplog.text.count("1 event(s) could not be posted") == 1


@contextmanager
def dead_server() -> Iterator[tuple[str, list[int]]]:
    """A port that accepts each connection and closes it at once: (URL, attempts)."""
    sock = socket.create_server(("127.0.0.1", 0))
    attempts = [0]

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            attempts[0] += 1
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/cb", attempts
    finally:
        sock.close()


def test_a_dead_callback_costs_one_attempt_per_event_once_one_was_given_up_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with dead_server() as (url, attempts), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent")
        for event in ("start", "step", "step", "step", "error"):
            cb.post(event)
        cb.close()
    # requests itself retries nothing; the poster tries the first event ATTEMPTS times.
    assert attempts[0] == callback.ATTEMPTS + 4
    assert "5 event(s) could not be posted" in caplog.text


def test_close_gives_up_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past CLOSE_WAIT, what is queued is dropped untried. The poster's clock is the
    test's: each answer of the busy server takes it 1 s on, and a wait before a retry
    as long as the wait asks, so the real clock plays no part."""

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

        def __getattr__(self, name: str) -> object:
            return getattr(time, name)

    clock = Clock()
    monkeypatch.setattr(callback, "time", clock)
    monkeypatch.setattr(callback, "CLOSE_WAIT", 3.0)
    tried: list[object] = []

    def always_busy(body: dict[str, object], n: int) -> tuple[int, dict[str, str]]:
        tried.append(body["seq"])
        clock.now += 1.0
        return 503, {"Retry-After": "120"}

    with server(always_busy) as (url, took, _), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent", deferred=True)  # no attempt before close() sets the deadline
        for _ in range(20):
            cb.post("progress")
        cb.close()
    # The first event at 0, 1.05 and 2.1 s (each wait cut to RETRY_WAIT): at 3.1 s, past
    # the deadline, it is given up on, and the 19 others are dropped without a try.
    assert tried == [1, 1, 1] and took == []
    assert "20 event(s) could not be posted" in caplog.text


def _posters() -> set[threading.Thread]:
    """The callback threads alive (other tests' may still be)."""
    return {t for t in threading.enumerate() if t.name == "callback"}


def test_deferred_events_wait_for_start() -> None:
    """A layout queues its first events before it forks its streams, and starts the
    poster's thread after: a fork copies no thread, only the locks it held."""
    with server(ok) as (url, took, _):
        before = _posters()
        cb = Callback(url, "layout", deferred=True)
        cb.post("os_booted")
        time.sleep(0.2)
        assert took == [] and _posters() == before
        cb.start()
        cb.post("done")
        cb.close()
    assert [e["event"] for e in took] == ["os_booted", "done"]


def test_no_url_posts_nothing_and_starts_no_thread() -> None:
    got: list[dict[str, object]] = []
    before = _posters()
    cb = Callback(None, "agent", emit=got.append)
    cb.post("start")
    assert _posters() == before
    cb.close()
    assert [e["event"] for e in got] == ["start"]


@pytest.mark.parametrize(
    ("header", "want"), [("3", 3.0), ("0", 0.0), ("-2", 0.0), (None, 1.5), ("soon", 1.5)]
)
def test_retry_after_takes_delays_and_ignores_the_rest(header: str | None, want: float) -> None:
    assert retry_after(header, 1.5) == want


def test_an_event_that_cannot_be_sent_at_all_spares_the_next(caplog: pytest.LogCaptureFixture) -> None:
    with server(ok) as (url, took, sent), caplog.at_level(logging.WARNING):
        cb = Callback(url, "layout")
        cb.post("progress", data={"not json": object()})
        cb.post("done")
        cb.close()
    assert sent == ["done"] and [e["event"] for e in took] == ["done"]
    assert "could not post progress" in caplog.text and "1 event(s) could not be posted" in caplog.text


def test_close_with_a_full_queue_returns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past QUEUE events waiting, new ones are dropped and counted; close() neither
    blocks nor loses count."""
    monkeypatch.setattr(callback, "QUEUE", 3)
    with server(ok, delay=0.1) as (url, took, _), caplog.at_level(logging.WARNING):
        cb = Callback(url, "layout")
        for i in range(10):
            cb.post("progress", files=i)
        cb.close()
    files = [int(str(e["files"])) for e in took]
    assert files == sorted(files) and 3 <= len(files) <= 4
    assert f"{10 - len(files)} event(s) could not be posted" in caplog.text


def test_every_event_fits_what_serve_takes(tmp_path: Path) -> None:
    """The agent's final error carried its message whole: on a 90-disk machine whose
    disks are all too small, 5338 characters. `bootenv serve` refused it (400, over its
    MAX_TEXT), so the machine showed no error, while the step's `failed` event, cut by
    hand, got through. Every text field of every event is cut to fit now, in one place."""
    names = ["".join(p) for p in itertools.islice(itertools.product(string.ascii_lowercase, repeat=2), 90)]
    disks = [DiskInfo(f"/dev/sd{n}", 1 << 30, rotational=True) for n in names]
    with pytest.raises(UserError) as info:
        choose_disk(disks, DiskSelector(), 8 << 30)
    message = str(info.value)
    assert len(message) > event_schema.MAX_TEXT
    make_image(tmp_path / "images")
    mac = "52:54:00:00:00:70"
    with running(ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0)) as srv:
        cb = Callback(f"http://127.0.0.1:{srv.port}/callback/{mac}", "agent")
        with pytest.raises(UserError), cb.step("disk"):
            raise info.value
        cb.post("error", message=message, fatal=False, data={"timings": {"manifest": 1.5}})
        cb.post("conflict", component="web", path="/etc/\x00" + "é" * 5000, fatal=False)
        cb.post("components_laid_out", data={"notes": ["\U0001f4be" * 6000]})
        cb.post("error", message="\U0001f4be" * 3000 + "\udcff" * 3000, fatal=True, data={"timings": {}})
        cb.close()
        events = srv.store.events(mac)
    assert [(e["event"], e.get("status")) for e in events] == [
        ("step", "start"),
        ("step", "failed"),
        ("error", None),
        ("conflict", None),
        ("components_laid_out", None),
        ("error", None),
    ]
    for failed in events[1:3]:
        assert failed["message"].startswith(message[:3000])
        assert failed["message"].endswith(f" [cut: {len(message)} characters]")
    assert events[2]["data"] == {"timings": {"manifest": 1.5}}
    assert events[3]["path"].startswith("/etc/\\x00éé")
    assert events[4]["data"]["cut"].startswith("data left out: the event was ")
    assert events[5]["message"].endswith(" [cut: 6000 characters]")


def test_the_cut_keeps_under_serves_limits() -> None:
    """The worst an event can be: every text field as long as it may be, in characters
    JSON writes as 12 bytes each, and data too."""
    assert callback.MAX_TEXT <= event_schema.MAX_TEXT
    huge = "\U0001f4be" * event_schema.MAX_TEXT
    body = {k: huge for k, typ in event_schema._FIELDS.items() if typ is str}
    body.update(event=huge, data={"x": huge * 10}, time=time.time(), seq=10**9)
    sent = json.dumps(callback.fit(body))
    assert len(sent) <= serve.MAX_BODY
    fitted = json.loads(sent)
    assert all(len(v) <= event_schema.MAX_TEXT for v in fitted.values() if isinstance(v, str))
    assert callback.fit({"event": "done", "message": "short\x00"}) == {
        "event": "done",
        "message": "short\\x00",
    }


def refusing(code: int, reason: bytes | str, first: str = "step", *, replaced: bool = False) -> Answer:
    """Refuse the event `first` with `code` and `reason` (text: as serve's JSON error,
    with `"replaced": true` if `replaced`)."""
    doc: dict[str, object] = {"error": reason, **({"replaced": True} if replaced else {})}
    content = json.dumps(doc).encode() if isinstance(reason, str) else reason

    def answer(body: dict[str, object], n: int) -> tuple[int, dict[str, str], bytes]:
        if body["event"] == first:
            return code, {"Content-Type": "application/json"}, content
        return 200, {"Content-Type": "application/json"}, b'{"state": "provisioning"}'

    return answer


REASON = (
    "52:54:00:00:00:70 was assigned again since assignment 0123456789abcdef: its run's events are not taken"
)


def test_a_409_names_serves_reason_and_ends_the_runs_posting(caplog: pytest.LogCaptureFixture) -> None:
    """Serve answers 409 to every event of a run whose assignment was replaced: the
    warning said `HTTP 409` only, and the agent went on writing the old image. The
    reason is kept for it now, and the events after are not sent, to be refused too."""
    with server(refusing(409, REASON, replaced=True)) as (url, took, sent), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent")
        assert cb.superseded is None
        cb.post("step", step="write-os", status="done")
        deadline = time.monotonic() + 10
        while cb.superseded is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cb.superseded == REASON
        cb.post("error", message="stopped", fatal=True)
        cb.close()
    assert sent == ["step"] and took == []
    assert (
        f"could not post step to {url}: HTTP 409: {REASON}; this run's assignment was replaced" in caplog.text
    )
    assert "2 event(s) could not be posted" in caplog.text


@pytest.mark.parametrize("code", [404, 500, 409])
def test_other_refusals_name_the_reason_and_spare_the_run(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A 409 without `"replaced": true` too: serve's answer for a machine whose record is
    gone (serve restarted on an empty --state), or to a URL naming no assignment. Taken
    for "assigned again", it stopped every agent running and wiped their disks."""
    with server(refusing(code, "no such machine")) as (url, took, sent), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent")
        cb.post("step")
        cb.post("done")
        cb.close()
    assert cb.superseded is None
    assert sent == ["step", "done"] and [e["event"] for e in took] == ["done"]
    assert f"could not post step to {url}: HTTP {code}: no such machine" in caplog.text


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # Control characters escaped, as one line: the console is a terminal.
        (json.dumps({"error": "refused\n\x1b[2Jnow\x00"}).encode(), r"refused\n\x1b[2Jnow\x00"),
        (
            json.dumps({"error": "x" * 3000}).encode(),
            "x" * (callback.MAX_REASON - 6) + " [cut]",
        ),  # < MAX_ANSWER
        (b"<html>Conflict</html>", None),  # not JSON: the status only
        (b'{"error": 409}', None),
        (b"\xff\xfe{", None),
        (b"[" * 100_000, None),  # read up to MAX_ANSWER, which is not JSON then
        (json.dumps({"error": "big " * 250_000}).encode(), None),
    ],
)
def test_an_answers_reason_is_one_short_line_whatever_the_body(
    body: bytes, reason: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with server(refusing(409, body)) as (url, _, sent), caplog.at_level(logging.WARNING):
        cb = Callback(url, "agent")
        cb.post("step")
        cb.close()
    said = "HTTP 409" + (f": {reason}" if reason else "")
    assert sent == ["step"] and cb.superseded is None  # none says "replaced"
    warning = caplog.records[0].getMessage()
    assert warning == f"could not post step to {url}: {said}"


def test_a_huge_refusal_spares_the_next_event(caplog: pytest.LogCaptureFixture) -> None:
    """The answer is read up to MAX_ANSWER: the connection it was cut on is closed, and
    the next event goes over a new one."""
    connections: list[int] = []
    huge = json.dumps({"error": "x" * 5_000_000}).encode()
    with server(refusing(400, huge), connections=connections) as (url, took, sent):
        cb = Callback(url, "agent")
        cb.post("step")
        cb.post("done")
        cb.close()
    assert sent == ["step", "done"] and [e["event"] for e in took] == ["done"]
    assert len(connections) == 2


def test_answers_read_to_their_end_keep_the_connection() -> None:
    """The answers are streamed to read no more than MAX_ANSWER: serve's short ones are
    read whole, and every event goes over the one connection."""
    connections: list[int] = []
    with server(refusing(400, "bad"), connections=connections) as (url, took, sent):
        cb = Callback(url, "agent")
        for event in ("start", "step", "progress", "done"):
            cb.post(event)
        cb.close()
    assert sent == ["start", "step", "progress", "done"] and len(took) == 3
    assert len(connections) == 1
