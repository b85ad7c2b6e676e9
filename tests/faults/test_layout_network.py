"""Server restarts, stalls and 5xx answers during `layout`: bounded retries, then a clear end."""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from bootenv.cli import main
from bootenv.errors import RetryableError
from bootenv.source import HttpSource
from tests.conftest import serving
from tests.faults.conftest import Image, SleepLog
from tests.faults.helpers import FAST, RestartableServer, blob_of, run_layout, tree
from tests.unit.httpfault import Fault, FaultServer

# Tens of seconds of layouts over a faulty server: `make test` and `make slow` run them.
pytestmark = pytest.mark.slow


def test_server_restart_mid_stream_completes(image: Image, tmp_path: Path) -> None:
    file, size = blob_of(image.dir, "good")
    at = size // 2
    first = RestartableServer(image.dir)
    first.faults[file] = Fault(stall_at=at, stall_seconds=2.0)  # holds the stream open mid-way
    second: list[RestartableServer] = []

    def restart() -> None:
        if not first.stalled.wait(30):
            return  # the layout failed to reach the stall; its assertions say so
        first.stop()  # cuts the connection in flight; the port refuses for a moment
        second.append(RestartableServer(image.dir, first.port).__enter__())

    first.__enter__()
    orchestrator = threading.Thread(target=restart)
    orchestrator.start()
    try:
        res, _ = run_layout(first.url, tmp_path / "root")
    finally:
        orchestrator.join()
        if not second:
            first.stop()
        for s in second:
            s.__exit__(None, None, None)
    assert res.ok, [c.error for c in res.components]
    assert tree(tmp_path / "root") == image.clean
    assert [r.start for r in first.requests_for(file)] == [0]
    resumed = second[0].requests_for(file)
    assert [(r.start, r.status) for r in resumed] == [(at, 206)], "resumed on the new server where it was cut"


def test_stall_longer_than_the_timeout_is_retried(
    image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    file, size = blob_of(image.dir, "bad")
    at = size // 3
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(stall_at=at, stall_seconds=1.5)
        short = replace(FAST, timeout=0.3)
        monkeypatch.setattr("bootenv.source.RetryPolicy", lambda: short)
        res, _ = run_layout(srv.url, tmp_path / "root")
    assert res.ok, [c.error for c in res.components]
    assert tree(tmp_path / "root") == image.clean
    starts = [r.start for r in srv.requests_for(file)]
    # urllib3 drops a partly read chunk on a timeout, so the resume may start earlier.
    assert len(starts) >= 2 and starts == sorted(starts) and starts[1] <= at
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_5xx_burst_is_retried_with_doubling_backoff(
    image: Image, tmp_path: Path, fast_retries: SleepLog
) -> None:
    file, _ = blob_of(image.dir, "good")
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(errors=3, status=503)
        res, _ = run_layout(srv.url, tmp_path / "root")
    assert res.ok
    assert tree(tmp_path / "root") == image.clean
    assert [r.status for r in srv.requests_for(file)] == [503, 503, 503, 200]
    assert fast_retries.delays == [FAST.delay(0), FAST.delay(1), FAST.delay(2)]
    assert fast_retries.delays == [0.01, 0.02, 0.04]


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_persistent_5xx_gives_up_with_one_line(
    image: Image, tmp_path: Path, fast_retries: SleepLog, status: int
) -> None:
    file, _ = blob_of(image.dir, "bad")
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(errors=-1, status=status)
        res, act = run_layout(srv.url, tmp_path / "root")
    assert not res.ok
    (bad,) = [c for c in res.components if c.name == "bad"]
    assert bad.status == "failed" and bad.error is not None
    assert "giving up" in bad.error and f"HTTP {status}" in bad.error and "\n" not in bad.error
    assert len(srv.requests_for(file)) == FAST.attempts  # bounded
    assert fast_retries.delays == [FAST.delay(i) for i in range(FAST.attempts - 1)]
    assert act.calls == [(tmp_path / "root", ["good.service"])]  # the healthy one goes on


def test_persistent_cut_gives_up_then_a_rerun_converges(image: Image, tmp_path: Path) -> None:
    file, size = blob_of(image.dir, "bad")
    cut = size * 2 // 3
    root = tmp_path / "root"
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(drop_always=cut)
        res, act = run_layout(srv.url, root)
        (bad,) = [c for c in res.components if c.name == "bad"]
        assert bad.status == "failed" and f"at byte {cut}" in (bad.error or "")
        assert [r.start for r in srv.requests_for(file)] == [0] + [cut] * (FAST.attempts - 1)
        assert "pkg-bad" not in (root / "var/lib/dpkg/status").read_text()
        # The network heals: the re-run finishes the component and equals a clean run.
        del srv.faults[file]
        res, act = run_layout(srv.url, root)
    assert res.ok and {c.name: c.status for c in res.components} == {"good": "resumed", "bad": "done"}
    got, want = tree(root), dict(image.clean)
    # dpkg's status is merged as components succeed, so the paragraphs' order follows
    # the runs (the order means nothing to dpkg); everything else is byte-identical.
    status = "var/lib/dpkg/status"
    assert paragraphs(got.pop(status)) == paragraphs(want.pop(status))
    assert got == want
    assert act.calls == [(root, ["bad.service", "good.service"])]


def paragraphs(entry: tuple[object, ...]) -> list[bytes]:
    body = entry[4]
    assert isinstance(body, bytes)
    return sorted(p for p in body.split(b"\n\n") if p.strip())


def test_the_reader_raises_one_retryable_error(image: Image) -> None:
    file, size = blob_of(image.dir, "good")
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(errors=-1, status=503)
        reader = HttpSource(srv.url, FAST).open(file, size)
        with pytest.raises(RetryableError) as err:
            reader.read(1024)
    assert str(err.value).count("\n") == 0 and "after 4 attempts at byte 0" in str(err.value)


def test_cli_reports_a_dead_server_in_one_line(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bootenv.layout as lay

    monkeypatch.setattr(lay, "activate", lambda root, units: [])
    file, _ = blob_of(image.dir, "good")
    root = tmp_path / "root"
    root.mkdir()
    with RestartableServer(image.dir) as srv:
        srv.faults[file] = Fault(errors=-1, status=503)
        rc = main(["layout", "--image", srv.url, "--components", "good", "--root", str(root), "--insecure"])
    captured = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in captured.out + captured.err
    assert any("giving up" in line for line in (captured.out + captured.err).splitlines())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_download_stops_the_layout_cleanly(
    image: Image, srv: FaultServer, tmp_path: Path, sig: str, allow_run: None
) -> None:
    """systemd stops a unit with SIGTERM to all its processes, Ctrl-C sends SIGINT to the
    process group: either way the layout stops at once, says so in one line, and leaves no
    temp file in the tree."""
    import os
    import signal
    import subprocess
    import sys

    file, size = blob_of(image.dir, "bad")
    srv.faults[file] = Fault(stall_at=size // 2, stall_seconds=20.0)
    root = tmp_path / "root"
    root.mkdir()
    argv = [sys.executable, "-m", "bootenv", "layout", "--image", srv.url, "--components", "all"]
    argv += ["--root", str(root), "--streams", "2", "--insecure"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert srv.stalled.wait(30), "the download did not reach the stall"
        os.killpg(proc.pid, getattr(signal, sig))
        _, err = proc.communicate(timeout=90)  # a hang guard: the stall lasts 20 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not srv.resumed.is_set(), "the layout waited out the server's stall"
    # SIGTERM: ended by the signal itself once cleaned up (a shell shows 143; systemd
    # counts it a clean stop). Ctrl-C: exit 130.
    assert proc.returncode == (-signal.SIGTERM if sig == "SIGTERM" else 130)
    assert err.splitlines()[-1] == ("bootenv: terminated" if sig == "SIGTERM" else "bootenv: interrupted")
    assert "Traceback" not in err
    left = [p for p in root.rglob("*") if p.name.startswith(".bootenv~")]
    assert left == []


class _RepeatedLength(SimpleHTTPRequestHandler):
    """Sends every Content-Length twice over, joined (`112, 112`): valid, RFC 7230 3.3.2."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "content-length":
            value = f"{value}, {value}"
        super().send_header(keyword, value)


def test_a_repeated_content_length_lays_out_the_clean_tree(image: Image, tmp_path: Path) -> None:
    with serving(partial(_RepeatedLength, directory=str(image.dir))) as url:
        res, _ = run_layout(f"{url}/", tmp_path / "root")
    assert res.ok, [c.error for c in res.components]
    assert tree(tmp_path / "root") == image.clean
