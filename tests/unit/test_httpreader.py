"""HttpReader: a download nobody wants any more ends now, whatever it waits on; the
headers a server sends are checked, and a malformed one is one clear error."""

from __future__ import annotations

import io
import random
import threading
from pathlib import Path

import pytest

from bootenv import httpreader as httpreader_mod
from bootenv.errors import RetryableError
from bootenv.httpreader import HttpReader, ReadAbortedError, RetryPolicy
from bootenv.httpsession import new_session
from tests.unit.httpfault import Fault, FaultServer

# Seconds: shorter than the read timeout. A read that ends on its abort ends while the
# server still stalls (FaultServer.resumed is not set): one that waited it out would not.
STALL = 20.0
POLICY = RetryPolicy(attempts=6, backoff=10.0, max_backoff=10.0, timeout=30.0)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    (tmp_path / "blob").write_bytes(random.Random(1).randbytes(64 << 10))
    return tmp_path


def _reader(srv: FaultServer, policy: RetryPolicy = POLICY) -> HttpReader:
    import requests

    return HttpReader(requests.Session(), srv.url + "blob", 64 << 10, policy)


def _abort_when(reader: HttpReader, ready: threading.Event) -> None:
    """Read on; abort from another thread once `ready` is set (the server stalls, or the
    reader waits to retry). The read must raise ReadAbortedError."""

    def aborter() -> None:
        if ready.wait(30):  # else the read is not where the test means it to be: it fails
            reader.abort()

    thread = threading.Thread(target=aborter, daemon=True)
    thread.start()
    with pytest.raises(ReadAbortedError):
        while reader.read(1024):
            pass
    thread.join()


def test_an_aborted_reader_makes_no_request(blob: Path) -> None:
    with FaultServer(blob) as srv:
        reader = _reader(srv)
        reader.abort()
        with pytest.raises(ReadAbortedError):
            reader.read(1024)
    assert srv.requests == []


def test_a_read_stalled_on_the_network_ends_when_aborted(blob: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The abort lands once the reader has all the server sent and reads on the socket.
    reading = threading.Event()
    real_read = HttpReader._read_raw

    def read_raw(self: HttpReader, n: int) -> bytes:
        if self.pos == 8192:
            reading.set()
        return real_read(self, n)

    monkeypatch.setattr(HttpReader, "_read_raw", read_raw)
    with FaultServer(blob) as srv:
        srv.faults["blob"] = Fault(stall_at=8192, stall_seconds=STALL)
        reader = _reader(srv)
        _abort_when(reader, reading)
        assert not srv.resumed.is_set(), "the read waited out the server's stall"
        assert reader.pos == 8192
    assert len(srv.requests) == 1, "not retried"


def test_an_abort_while_connecting_ends_the_read_once_connected(
    blob: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abort finds no socket to shut down yet; the first body byte is held up."""
    real = HttpReader._connect

    def connect(self: HttpReader) -> None:
        self.abort()  # lands while the request is on its way
        real(self)

    monkeypatch.setattr(HttpReader, "_connect", connect)
    with FaultServer(blob) as srv:
        srv.faults["blob"] = Fault(stall_at=0, stall_seconds=STALL)
        reader = _reader(srv)
        with pytest.raises(ReadAbortedError):
            reader.read(1024)
        assert not srv.resumed.is_set(), "the read waited out the server's stall"
    assert reader.pos == 0


def test_a_request_waiting_for_its_headers_ends_when_aborted(blob: Path) -> None:
    """HttpSource's session tells the reader its socket before any answer is in."""
    with FaultServer(blob) as srv:
        srv.faults["blob"] = Fault(stall_headers=STALL)
        reader = HttpReader(new_session(), srv.url + "blob", 64 << 10, POLICY)
        _abort_when(reader, srv.stalled)
        assert not srv.resumed.is_set(), "the read waited out the server's stall"
        assert reader.pos == 0
    assert len(srv.requests) == 1, "not retried"


def test_a_kept_alive_connection_is_cut_while_waiting_for_headers(blob: Path) -> None:
    """The second request on one connection: its socket is reported as it goes out."""
    (blob / "other").write_bytes(b"x" * 100)
    session = new_session()
    with FaultServer(blob) as srv:
        assert HttpReader(session, srv.url + "other", 100, POLICY).read() == b"x" * 100
        srv.faults["blob"] = Fault(stall_headers=STALL)
        reader = HttpReader(session, srv.url + "blob", 64 << 10, POLICY)
        _abort_when(reader, srv.stalled)
        assert not srv.resumed.is_set(), "the read waited out the server's stall"
    assert [r.path for r in srv.requests] == ["other", "blob"]


def test_a_request_through_a_proxy_waiting_for_headers_ends_when_aborted(
    blob: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through an HTTP proxy (`http_proxy`), the socket reported is the one to the proxy.
    The fault server plays the proxy: the request names the whole URL, and nothing goes
    to the host it names (.invalid never resolves)."""
    with FaultServer(blob) as srv:
        monkeypatch.setenv("http_proxy", srv.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        srv.faults["blob"] = Fault(stall_headers=STALL)
        reader = HttpReader(new_session(), "http://images.example.invalid/blob", 64 << 10, POLICY)
        _abort_when(reader, srv.stalled)
        assert not srv.resumed.is_set(), "the read waited out the server's stall"
        assert reader.pos == 0
    assert [r.path for r in srv.requests] == ["blob"], "asked through the proxy, not retried"


def test_an_abort_during_a_retry_backoff_ends_it(blob: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abort lands once the reader waits to retry; a backoff of an hour that it did
    not cut short would leave the read hanging (the join below fails it)."""
    waiting = threading.Event()
    real_wait = httpreader_mod.backoff_wait

    def backoff_wait(stop: threading.Event, seconds: float) -> bool:
        waiting.set()
        return real_wait(stop, seconds)

    monkeypatch.setattr(httpreader_mod, "backoff_wait", backoff_wait)
    hour = RetryPolicy(attempts=6, backoff=3600.0, max_backoff=3600.0, timeout=30.0)
    with FaultServer(blob) as srv:
        srv.faults["blob"] = Fault(errors=-1, status=503)
        reader = _reader(srv, hour)
        raised: list[BaseException] = []

        def read_all() -> None:
            try:
                while reader.read(1024):
                    pass
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=read_all, daemon=True)
        thread.start()
        assert waiting.wait(30), "the reader never waited to retry"
        reader.abort()
        thread.join(60)
        assert not thread.is_alive(), "hung: the abort did not end the backoff"
    assert [type(e) for e in raised] == [ReadAbortedError]
    assert len(srv.requests) == 1


def test_aborting_a_finished_reader_leaves_the_next_one_alone(blob: Path) -> None:
    """A reader whose body is all read has given its connection back to the pool: its
    abort must not shut down that socket, which the next reader now uses."""
    (blob / "small").write_bytes(b"s" * 100)
    session = new_session()
    with FaultServer(blob) as srv:
        done = HttpReader(session, srv.url + "small", 100, POLICY)
        assert done.read(1 << 20) == b"s" * 100 and done.read(1) == b""
        srv.faults["blob"] = Fault(stall_at=8192, stall_seconds=1.0)
        busy = HttpReader(session, srv.url + "blob", 64 << 10, POLICY)
        first = busy.read(1024)
        assert srv.stalled.wait(5)
        done.abort()
        rest = first + busy.read()
    assert rest == (blob / "blob").read_bytes() and busy.resumes == 0
    assert [r.path for r in srv.requests] == ["small", "blob"]


class _Answer:
    """A 200 answer with the whole blob and the Content-Length header given."""

    def __init__(self, data: bytes, length: str) -> None:
        self.status_code = 200
        self.headers = {"Content-Length": length}
        self.raw = io.BytesIO(data)

    def close(self) -> None:
        pass


class _Session:
    def __init__(self, data: bytes, length: str) -> None:
        self.data, self.length = data, length

    def get(self, url: str, **kw: object) -> _Answer:
        return _Answer(self.data, self.length)


def test_a_repeated_content_length_of_equal_values_is_accepted() -> None:
    """RFC 7230 3.3.2: `Content-Length: 112, 112` (a header repeated, then joined)."""
    data = random.Random(2).randbytes(112)
    for length in ("112, 112", "112,112", "112, 112, 112"):
        reader = HttpReader(_Session(data, length), "http://gold/blob", len(data), POLICY)
        assert reader.read() == data


@pytest.mark.parametrize(
    "length", ["112, 113", "abc", "", "-112", "0x70", "\uff11\uff11\uff12", "112;", "9" * 5000]
)
def test_a_malformed_content_length_is_one_retryable_error(length: str) -> None:
    data = random.Random(2).randbytes(112)
    policy = RetryPolicy(attempts=2, backoff=0.0, max_backoff=0.0, timeout=5.0)
    reader = HttpReader(_Session(data, length), "http://gold/blob", len(data), policy)
    with pytest.raises(RetryableError) as err:
        reader.read()
    text = str(err.value)
    assert text == (
        f"giving up on http://gold/blob after 2 attempts at byte 0: "
        f"http://gold/blob: the server sent a malformed Content-Length ({length[:40]!r})"
    )


def test_a_file_of_no_known_size_cut_short_is_resumed_to_the_length_the_server_gave(blob: Path) -> None:
    """The manifest and its signature are read with no size to hold them to: a body
    cut short (a clean close mid-body) was taken as the whole file, and a manifest cut
    so was "not valid JSON", never tried again. The server's length is held to instead."""
    policy = RetryPolicy(attempts=3, backoff=0.0, max_backoff=0.0, timeout=30.0)
    whole = (blob / "blob").read_bytes()
    with FaultServer(blob) as srv:
        srv.faults["blob"] = Fault(drops=[len(whole) // 2])
        reader = HttpReader(new_session(), srv.url + "blob", None, policy)
        assert reader.read() == whole
    assert [r.start for r in srv.requests_for("blob")] == [0, len(whole) // 2]


def test_a_content_range_start_that_is_no_ascii_number_is_malformed_not_a_crash() -> None:
    from bootenv.httpreader import _range_start

    assert _range_start("bytes 204717-300000/300001") == 204717
    # str.isdigit() takes superscripts (which int() refuses) and other scripts' digits.
    for bad in (
        "bytes ²04717-300000/300001",
        "bytes ٣-5/6",
        "bytes 1_0-5/6",
        "bytes -5/6",
        "bits 1-5/6",
        "bytes 1" + "0" * 30 + "-5/6",
    ):
        assert _range_start(bad) == -1, bad
