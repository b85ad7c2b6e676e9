"""The one door to the outside: every subprocess bootenv starts goes through here.

Unit tests replace `_spawn` so that an unexpected call fails the test.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from bootenv.errors import CommandError, UserError

log = logging.getLogger(__name__)

Arg = str | Path


def _argv(args: Sequence[Arg]) -> list[str]:
    return [str(a) for a in args]


def which(tool: str) -> str:
    """Return the full path of `tool`, or fail with a hint to install it."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise UserError(f"required tool not found: {tool}", hint="run `make deps`")
    return found


def run(
    args: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion, logging its argv, raising CommandError on failure."""
    argv = _argv(args)
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = _spawn(argv, input=input, capture=capture, env=env, cwd=cwd, timeout=timeout)
    except FileNotFoundError as exc:
        raise UserError(f"required tool not found: {argv[0]}", hint="run `make deps`") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if proc.stderr else ""
        raise CommandError(argv, proc.returncode, err)
    return proc


def _spawn(
    argv: list[str],
    *,
    input: bytes | None,
    capture: bool,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    timeout: float | None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv,
        input=input,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


class Stream:
    """A running streaming command whose stderr goes to a temp file (no pipe deadlock)."""

    def __init__(self, argv: list[str], popen: subprocess.Popen[bytes], err: IO[bytes]) -> None:
        self.argv = argv
        self.popen = popen
        self._err = err

    @property
    def stdout(self) -> IO[bytes]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    def wait_ok(self, ok_codes: tuple[int, ...] = (0,)) -> str:
        """Wait for the command and raise CommandError unless it succeeded; return what
        it wrote to stderr."""
        code = self.popen.wait()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace")
        self._err.close()
        if code not in ok_codes:
            raise CommandError(self.argv, code, err)
        return err

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._err.close()


def popen(
    args: Sequence[Arg],
    *,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = subprocess.PIPE,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Stream:
    """Start a streaming command (e.g. `tar -c`); the caller must call `wait_ok`.
    `env`: set in the command's environment, over this process's."""
    argv = _argv(args)
    log.debug("popen: %s", shlex.join(argv))
    err = tempfile.TemporaryFile()
    try:
        proc = _popen(argv, stdin=stdin, stdout=stdout, stderr=err, cwd=cwd, env=env)
    except FileNotFoundError as exc:
        err.close()
        raise UserError(f"required tool not found: {argv[0]}", hint="run `make deps`") from exc
    return Stream(argv, proc, err)


def _popen(
    argv: list[str],
    *,
    stdin: int | IO[bytes] | None,
    stdout: int | IO[bytes] | None,
    stderr: IO[bytes],
    cwd: Path | None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env} if env else None
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=full)
