"""The CLI edge: one-line errors, exit codes, inspect over a directory and over HTTP."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from bootenv.cli import main
from tests.conftest import serving


@pytest.fixture
def served(image_dir: Path) -> Iterator[str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(image_dir))
    with serving(handler) as url:
        yield url + "/"


def test_inspect_dir(image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(image_dir)]) == 0
    out = capsys.readouterr().out
    assert "Debian GNU/Linux 12 (bookworm)" in out
    assert "php" in out and "apache" in out
    assert "units: apache2.service" in out


def test_inspect_shows_the_sources_free_text_escaped(
    image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The captured machine's host name, OS name and kernel are its own text: a
    terminal escape in one (ESC]0; retitled the terminal) is shown, not obeyed."""
    doc = json.loads((image_dir / "manifest.json").read_text())
    doc["source"]["hostname"] = "h\x1b]0;PWNED\x07"
    doc["source"]["os_release"] = "Debian\nbootenv: error: fake \u202e"
    doc["source"]["kernel"] = "6.1\x9b2J"
    (image_dir / "manifest.json").write_text(json.dumps(doc))
    assert main(["inspect", str(image_dir)]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\x9b\u202e") and "bootenv: error" not in out.splitlines()[1]
    assert (
        "image of h\\x1b]0;PWNED\\x07: Debian\\nbootenv: error: fake \\u202e, amd64, kernel 6.1\\x9b2J" in out
    )


# The `bootenv` command ends the process without tearing the interpreter down (cli.run).
# A child runs it with an atexit function of its own, an object that says when it is torn
# down, and stdout on a pipe, where Python buffers it (unless PYTHONUNBUFFERED says not
# to, so that is left out): without the flush and the atexit functions, both outputs
# would be lost. With "thread", a thread that a normal exit waits for is still running.
_RUN = """
import atexit, sys, threading, time
from bootenv.cli import run
class Teardown:
    def __del__(self):
        print("torn down")
keep = Teardown()
atexit.register(print, "atexit ran")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
sys.argv[1:] = sys.argv[2:]
run()
"""


def _bootenv(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", _RUN, mode, *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_the_command_skips_teardown_after_its_output_and_atexit(image_dir: Path, allow_run: None) -> None:
    done = _bootenv("plain", "inspect", str(image_dir))
    assert done.returncode == 0, done.stderr
    assert "Debian GNU/Linux 12 (bookworm)" in done.stdout
    assert done.stdout.endswith("atexit ran\n") and "torn down" not in done.stdout


def test_the_command_keeps_a_failures_code_and_one_line(tmp_path: Path, allow_run: None) -> None:
    done = _bootenv("plain", "inspect", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("bootenv: error: ") and done.stderr.count("\n") == 1
    assert done.stdout == "atexit ran\n"


def test_the_command_exits_the_normal_way_while_a_thread_runs(tmp_path: Path, allow_run: None) -> None:
    done = _bootenv("thread", "inspect", str(tmp_path))
    assert done.returncode == 2
    assert "thread done" in done.stdout and "atexit ran" in done.stdout and "torn down" in done.stdout


def test_inspect_url_json(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", served, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in doc["components"]] == ["apache", "php", "mysql"]


def test_inspect_missing_url(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", served + "nope/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bootenv: error: ") and "404" in err and err.count("\n") == 1


def test_inspect_not_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a composite image" in capsys.readouterr().err


def test_inspect_bad_manifest(image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (image_dir / "manifest.json").write_text('{"format": "bootenv-composite", "version": 9}')
    assert main(["inspect", str(image_dir)]) == 2
    err = capsys.readouterr().err
    assert "unsupported manifest version 9" in err and "Traceback" not in err


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bootenv: error: ")
    assert main(["capture", "/nonexistent", "-o", "/tmp/x"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
