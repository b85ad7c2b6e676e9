"""Shared fixtures and the test tiers.

- Unit tests (no marker) may not start processes: `bootenv.run`, `subprocess.Popen`,
  `os.posix_spawn`, `os.system` and the `os.exec*` calls are blocked unless a test is
  marked `root` or `vm`, or asks for the `allow_run` fixture. (Forking is allowed: the
  layout's streams are forked processes.)
- `root` tests need root (loop devices, debootstrap, chroot); they skip, saying why,
  when the machine lacks that ability.
- `vm` tests boot QEMU (TCG).
- `slow` tests need no root but take tens of seconds (the load tests, the layout's network
  faults and resumes in tests/faults, kill -9 at random points, the archive fuzzers): `make
  test` runs them, `make check` leaves them out and `make slow` runs them alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import settings

import bootenv
from bootenv import run as run_mod
from bootenv.serve import on_thread

PKG_DIR = Path(bootenv.__file__).parent
TESTS_DIR = Path(__file__).resolve().parent

# `make check` and `make slow` fuzz briefly; `make test` (BOOTENV_FUZZ=thorough) long
# enough to matter.
settings.register_profile("quick", max_examples=60)
# Derandomized: CI explores the same 2000 examples every run, so a red run is reproducible;
# the quick profile explores new ones each time, and anything it finds becomes a regression case.
settings.register_profile("thorough", max_examples=2000, derandomize=True)
settings.load_profile(os.environ.get("BOOTENV_FUZZ", "quick"))


def seeds(quick: int, thorough: int) -> range:
    """The seeds of a randomized fault test: a few in `make check` (or `make slow`), all in
    `make test`."""
    return range(thorough if os.environ.get("BOOTENV_FUZZ") == "thorough" else quick)


class UnexpectedCommandError(AssertionError):
    pass


# The calls that start another program. subprocess.run, check_output and os.popen all go
# through subprocess.Popen; os.spawn* execs in a forked child.
_EXECS = ("execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe")
_SPAWNS = ("posix_spawn", "posix_spawnp", "system", *_EXECS)


@pytest.fixture(autouse=True)
def _no_subprocess(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    marks = {m.name for m in request.node.iter_markers()}
    if marks & {"root", "vm"} or "allow_run" in request.fixturenames:
        yield
        return
    # Each attempt is also written down, so that a test fails even where the code under
    # test catches the error (`except Exception` in layout._try, the agent), and even
    # when the attempt is made in a forked process (a layout stream): hence a file, by
    # name, created only by an attempt, appended to by whichever process makes it.
    record = Path(tempfile.gettempdir()) / f"bootenv-blocked-{os.getpid()}-{secrets.token_hex(8)}"

    def blocked(what: str, args: object) -> NoReturn:
        message = f"unit test tried to run a command ({what}): {args!r}"
        with open(record, "a") as f:
            f.write(message + "\n")
        raise UnexpectedCommandError(message)

    def refuse(what: str) -> Callable[..., NoReturn]:
        return lambda *args, **_: blocked(what, args)

    class BlockedPopen(subprocess.Popen[bytes]):
        def __init__(self, args: object, *_: object, **__: object) -> None:
            blocked("subprocess.Popen", args)

    monkeypatch.setattr(run_mod, "_spawn", refuse("bootenv.run"))
    monkeypatch.setattr(run_mod, "_popen", refuse("bootenv.run.popen"))
    monkeypatch.setattr(subprocess, "Popen", BlockedPopen)
    for name in _SPAWNS:
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    yield
    if record.exists():
        attempts = record.read_text()
        record.unlink()
        pytest.fail(f"the test tried to run commands, caught or not:\n{attempts}", pytrace=False)


@pytest.fixture
def allow_run() -> None:
    """Lets a unit test run real (fast, local) tools such as tar or mke2fs."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under tests/root and tests/vm get their tier marker from the directory: the
    # path's first part below tests/ (the checkout itself may well be under /root).
    for item in items:
        tier = tier_of(item.path)
        if tier and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))


def tier_of(path: Path) -> str | None:
    """The tier of a test file: root or vm under tests/root or tests/vm, else None."""
    path = path.resolve()
    if not path.is_relative_to(TESTS_DIR):
        return None
    parts = path.relative_to(TESTS_DIR).parts
    return parts[0] if parts and parts[0] in {"root", "vm"} else None


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, chroot, debootstrap)")


def require_tools(*tools: str) -> None:
    for tool in tools:
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            pytest.skip(f"{tool} is not installed (run `make deps`)")


@pytest.fixture(scope="session")
def gold_tree() -> Path:
    """The LAMP gold machine (debootstrap, cached in ~/.cache/bootenv)."""
    require_root()
    require_tools("debootstrap", "chroot")
    from bootenv.gold import gold_tree as build

    return build()


def code_key() -> str:
    """Changes whenever bootenv's source changes, so cached images are rebuilt."""
    h = hashlib.sha256()
    for path in sorted(PKG_DIR.rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


GOLD_COMPONENTS = ("apache=apache2", "mysql=mariadb-server", "php=php,libapache2-mod-php,php-mysql")


@pytest.fixture(scope="session")
def gold_image(gold_tree: Path) -> Path:
    """The gold machine captured with components apache, mysql and php (and --single)."""
    from bootenv.cache import cache_root, locked, prune
    from bootenv.capture import CaptureConfig, capture
    from bootenv.split import parse_component_arg

    out = cache_root() / "images" / f"{gold_tree.name}-{code_key()}"
    with locked(f"image-{out.name}"):
        if (out / "manifest.json").exists():
            return out
        # One image per version of the code: keep the last one besides the new one.
        prune(out.parent, f"{gold_tree.name}-{'?' * len(code_key())}", keep=1)
        capture(
            CaptureConfig(
                root=gold_tree,
                output=out,
                components=tuple(parse_component_arg(c) for c in GOLD_COMPONENTS),
                single=True,
                force=True,
            )
        )
        return out


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.fixture
def events() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """A callback endpoint on 127.0.0.1: (its URL, the JSON events it received, in order)."""
    got: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield f"{url}/cb", got


@contextlib.contextmanager
def serving(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`, on a thread,
    for the block: its base URL, `http://127.0.0.1:PORT`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    with on_thread(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"
