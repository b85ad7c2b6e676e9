"""The CLI's own input and output: stdout or stderr closed, a closed pipe, a bug.

Each case was found by trying it: before, a command with stderr closed died silently
with exit 1, a closed pipe was `[Errno 32] Broken pipe` (exit 1) or Python's two-line
"Exception ignored" message, output to a closed stdout was lost with exit 0, and an
unexpected exception was a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootenv import commands
from bootenv.cli import main

LOST = "bootenv: error: the output could not be written"


def _bootenv(
    *args: str, shell: str = '"$@"', stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    """`python -m bootenv ARGS`, started by `sh -c 'exec SHELL'` (where SHELL may close
    an fd: `"$@" 2>&-`)."""
    argv = ["sh", "-c", f"exec {shell}", "sh", sys.executable, "-m", "bootenv", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=60, check=False)


def test_a_command_with_stderr_closed_still_runs(tmp_path: Path, allow_run: None) -> None:
    from bootenv.signing import keygen, write_signature
    from tests.unit.test_signing import make_image

    image = make_image(tmp_path / "img")
    keygen(tmp_path / "k")
    write_signature(image, (image / "manifest.json").read_bytes(), tmp_path / "k")
    # verify draws progress on stderr: it asked a closed stderr whether it is a terminal
    done = _bootenv("verify", str(image), "--trust", str(tmp_path / "k.pub"), shell='"$@" 2>&-')
    assert done.returncode == 0 and b"manifest and 3 blobs verified" in done.stdout, done
    # and a failure's line, with stderr closed, is not written to stdout instead
    done = _bootenv("verify", str(tmp_path / "nope"), shell='"$@" 2>&-')
    assert done.returncode == 2 and done.stdout == b""


def _closed_pipe() -> int:
    """The write end of a pipe whose reader has gone."""
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.parametrize(
    "args", [("inspect", "IMG", "--json"), ("inspect", "IMG"), ("--version",), ("--help",)]
)
def test_output_into_a_closed_pipe_is_exit_120_and_one_line(
    args: tuple[str, ...], image_dir: Path, allow_run: None
) -> None:
    w = _closed_pipe()
    try:
        done = _bootenv(*(str(image_dir) if a == "IMG" else a for a in args), stdout=w)
    finally:
        os.close(w)
    assert done.returncode == 120
    assert done.stderr.decode() == f"{LOST} (a closed pipe)\n"


def test_output_to_a_closed_stdout_is_exit_120_not_lost_silently(image_dir: Path, allow_run: None) -> None:
    done = _bootenv("inspect", str(image_dir), "--json", shell='"$@" >&-')
    assert done.returncode == 120
    assert done.stderr.decode() == f"{LOST} (stdout is closed)\n"
    # a failure keeps its own code and line
    done = _bootenv("inspect", str(image_dir / "nope"), shell='"$@" >&-')
    assert (
        done.returncode == 2 and done.stderr.startswith(b"bootenv: error: ") and done.stderr.count(b"\n") == 1
    )


def test_a_bug_is_one_line_exit_1_and_a_traceback_only_with_debug(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise KeyError("oops")

    monkeypatch.setattr(commands, "cmd_inspect", broken)
    import bootenv.cli

    monkeypatch.setattr(bootenv.cli, "cmd_inspect", broken)
    assert main(["inspect", str(image_dir)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "bootenv: error: internal error: KeyError: 'oops' (hint: --debug shows where; please report it)\n"
    )
    assert main(["inspect", str(image_dir), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("bootenv: error: internal error: KeyError: 'oops'\n")
