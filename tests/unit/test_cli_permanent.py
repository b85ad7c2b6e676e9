"""Failures that trying again cannot fix are one line, exit 2, at once.

Before, a redirect loop or a redirect to another scheme was retried six times (15 s)
and ended with exit 3, and `build-ramdisk -o FILE` failed with "[Errno 17] File
exists", exit 1, only once the whole build was done.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

import bootenv.ramdisk
from bootenv.cli import main
from tests.conftest import serving


class _Redirects(BaseHTTPRequestHandler):
    """/loop/...: to itself; /ftp/...: to an ftp:// URL; /bad/...: to an unparsable URL."""

    requests = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests += 1
        where = {"/loop/": self.path, "/ftp/": "ftp://127.0.0.1/x", "/bad/": "http://[::1/x"}
        self.send_response(302)
        self.send_header("Location", where[self.path[: self.path.index("/", 1) + 1]])
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def redirects() -> Iterator[str]:
    _Redirects.requests = 0
    with serving(_Redirects) as url:
        yield url


@pytest.mark.parametrize(
    ("where", "words"),
    [("loop", "TooManyRedirects"), ("ftp", "InvalidSchema"), ("bad", "ValueError: Invalid IPv6 URL")],
)
def test_a_url_that_can_never_be_fetched_is_exit_2_at_once(
    redirects: str, where: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", f"{redirects}/{where}/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bootenv: error: cannot fetch {redirects}/{where}/manifest.json: {words}")
    assert err.count("\n") == 1
    assert _Redirects.requests <= 31  # requests follows 30 redirects, once


def test_build_ramdisk_refuses_an_output_that_is_no_directory_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(**kw: object) -> None:
        raise AssertionError("built before the output was checked")

    monkeypatch.setattr(bootenv.ramdisk, "build_ramdisk", build)
    (tmp_path / "mk.py").write_text("")
    for output, bad in (("mk.py", "mk.py"), ("mk.py/sub", "mk.py")):
        assert main(["build-ramdisk", "-o", str(tmp_path / output)]) == 2
        err = capsys.readouterr().err
        assert err == f"bootenv: error: -o {tmp_path / output}: {tmp_path / bad} is not a directory\n"
