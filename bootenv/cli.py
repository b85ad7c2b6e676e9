"""The command line: parse arguments at the edge, run one verb, catch errors once.

Exit codes: 0 success, 1 failure (a bug too), 2 usage or input error, 3 transient failure
(network) after retries, 4 verification failure (hash or size mismatch), 5 an external
command failed, 120 the output could not be written, 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from bootenv import __version__
from bootenv.commands import (
    add_trust_options,
    cmd_agent,
    cmd_assign,
    cmd_build_ramdisk,
    cmd_capture,
    cmd_conflicts,
    cmd_inspect,
    cmd_keygen,
    cmd_layout,
    cmd_machines,
    cmd_serve,
    cmd_sign,
    cmd_verify,
    cmd_write_os,
)
from bootenv.errors import BootenvError, UserError
from bootenv.log import setup_logging
from bootenv.prefetch import steady_memory
from bootenv.stdio import guard_streams, output_lost, say, stdout_broken

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message, hint=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="verbose log and tracebacks")
    parser = _Parser(
        prog="bootenv",
        description="Provision bare-metal and virtual servers from composite images.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage or input error, 3 network failure after "
        "retries, 4 verification failure, 5 an external command failed, 120 the output could "
        "not be written, 130 interrupted, "
        "143 terminated. "
        "See docs/CLI.md.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"bootenv {__version__}")
    # Not `required`: argparse would report a missing verb before an unknown option
    # (`bootenv --bogus`); main() asks for the verb once the options are known good.
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    _add_image_verbs(verbs, common)
    _add_install_verbs(verbs, common)
    _add_netboot_verbs(verbs, common)
    add_serve_verbs(verbs, common)
    return parser


def _add_image_verbs(verbs: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """Make, sign, check and show a composite image."""
    p = verbs.add_parser("capture", parents=[common], help="capture a gold machine as a composite image")
    p.add_argument("root", type=Path, metavar="ROOT", help="the gold machine's root: / or a tree")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--component", action="append", default=[], metavar="NAME=PKG[,PKG|/PATH...]")
    p.add_argument("--auto", action="store_true", help="one component per non-base service package")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="also leave out paths")
    p.add_argument("--single", action="store_true", help="also write the classic one-piece image")
    p.add_argument("--stop", action="append", default=[], metavar="SERVICE", help="quiesce (live /)")
    p.add_argument("--level", type=int, default=3, choices=range(1, 20), metavar="1-19")
    p.add_argument(
        "--scratch",
        default="auto",
        choices=("auto", "memory", "disk"),
        help="build the OS image in memory or on disk (auto: in memory if it fits twice)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_capture)

    p = verbs.add_parser("keygen", parents=[common], help="create an ed25519 signing key")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="KEY", help="writes KEY and KEY.pub")
    p.set_defaults(handler=cmd_keygen)

    p = verbs.add_parser("sign", parents=[common], help="sign a composite image's manifest")
    p.add_argument("image", type=Path, metavar="DIR")
    p.add_argument("--key", type=Path, required=True, metavar="KEY")
    p.set_defaults(handler=cmd_sign)

    p = verbs.add_parser("verify", parents=[common], help="check an image's signature and every blob")
    p.add_argument("image", metavar="DIR|URL")
    add_trust_options(p)
    p.add_argument("--manifest-only", action="store_true", help="check the signature only")
    p.set_defaults(handler=cmd_verify)

    p = verbs.add_parser("inspect", parents=[common], help="show a composite image's contents")
    p.add_argument("image", metavar="DIR|URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_inspect)


def _add_install_verbs(verbs: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """Put an image on a disk or into a root tree, and review what the layout left."""
    p = verbs.add_parser("write-os", parents=[common], help="stream the OS sub-image onto a disk or file")
    p.add_argument("--image", required=True, metavar="DIR|URL", help="the composite image")
    p.add_argument("--device", required=True, metavar="PATH", help="a disk, a partition or a regular file")
    p.add_argument("--single", action="store_true", help="write the classic one-piece image instead")
    add_trust_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_write_os)

    _add_layout_verb(verbs, common)

    p = verbs.add_parser("conflicts", parents=[common], help="review and resolve layout conflicts")
    p.add_argument("action", choices=("list", "show", "resolve"))
    p.add_argument("id", nargs="?", metavar="ID")
    p.add_argument("--root", type=Path, required=True, metavar="PATH")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep", choices=("existing", "incoming", "merged"))
    keep.add_argument("--file", type=Path, metavar="F", help="resolve with this file's content")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_conflicts)


def _add_layout_verb(verbs: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """`layout`: a function of its own, as it has the most options."""
    p = verbs.add_parser("layout", parents=[common], help="lay out component sub-images in a root tree")
    p.add_argument("--image", required=True, metavar="DIR|URL", help="the composite image")
    p.add_argument("--components", required=True, metavar="a,b|all|none")
    p.add_argument("--root", type=Path, required=True, metavar="PATH", help="/ or a mounted tree")
    p.add_argument(
        "--streams",
        type=_between(0, MAX_STREAMS_ASKED),
        default=0,
        metavar="N",
        help=f"parallel streams, at most {MAX_STREAMS_ASKED} (default 0: one per chunk, up to 4)",
    )
    p.add_argument("--callback", metavar="URL", help="POST JSON progress events here (best effort)")
    p.add_argument(
        "--retries",
        type=_between(0, MAX_RETRIES),
        default=0,
        metavar="N",
        help="try a failure that may pass (the network, a stream killed) again, up to N times, "
        f"after waiting 10, 30, 60, 120, then 300 s (default 0, at most {MAX_RETRIES})",
    )
    p.add_argument(
        "--deadline",
        type=_between(1, MAX_DEADLINE),
        metavar="SECONDS",
        help="stop and fail (exit 3, posted as fatal; a re-run resumes) if the layout, retries "
        "and waits included, has not finished this many seconds after it started",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --root /: lay out into the running system although bootenv did not provision it",
    )
    add_trust_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_layout)


def _add_netboot_verbs(verbs: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """The ramdisk a machine netboots, and its agent."""
    p = verbs.add_parser("agent", parents=[common], help="provision this machine's disk (ramdisk agent)")
    p.add_argument("--cmdline", type=Path, default=Path("/proc/cmdline"), metavar="FILE")
    for key in ("image", "components", "disk", "callback", "handoff", "hostname", "ssh-key", "trust"):
        p.add_argument(f"--{key}", metavar="VALUE", help=f"overrides bootenv.{key.replace('-', '_')}=")
    p.add_argument("--insecure", action="store_true", help="overrides bootenv.insecure (loudly)")
    p.add_argument("--single", action="store_true", help="overrides bootenv.single: write the single image")
    p.set_defaults(handler=cmd_agent)

    p = verbs.add_parser("build-ramdisk", parents=[common], help="build the netboot kernel and initramfs")
    p.add_argument("-o", "--output", type=Path, default=Path("build/ramdisk"), metavar="DIR")
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="KEY.pub",
        help="build this signing key in: the agent trusts images it signed (repeatable)",
    )
    p.set_defaults(handler=cmd_build_ramdisk)


def add_serve_verbs(verbs: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    state_help = "the machine state directory (default: $BOOTENV_STATE or /var/lib/bootenv)"
    p = verbs.add_parser("serve", parents=[common], help="serve images, iPXE menus and callbacks")
    p.add_argument(
        "--images", type=Path, required=True, metavar="DIR", help="composite images, one per subdir"
    )
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="ADDR:PORT")
    p.add_argument("--state", type=Path, metavar="DIR", help=state_help)
    p.add_argument("--boot", type=Path, metavar="DIR", help="holds the ramdisk's vmlinuz and initramfs.img")
    p.add_argument("--catalog", type=Path, metavar="FILE", help="menu entries (JSON or TOML)")
    p.add_argument("--public-url", metavar="URL", help="how iPXE clients reach this server")
    p.set_defaults(handler=cmd_serve)

    p = verbs.add_parser("assign", parents=[common], help="provision a machine on its next network boot")
    p.add_argument("mac", metavar="MAC")
    p.add_argument("image", metavar="IMAGE", help="an image name under serve's --images, or a URL")
    p.add_argument("--components", required=True, metavar="a,b|all|none")
    p.add_argument("--hostname", metavar="NAME")
    p.add_argument("--kernel-args", default="", metavar="ARGS", help="extra ramdisk kernel arguments")
    p.add_argument("--state", type=Path, metavar="DIR", help=state_help)
    p.set_defaults(handler=cmd_assign)

    p = verbs.add_parser("machines", parents=[common], help="each machine's state and timeline")
    p.add_argument("--state", type=Path, metavar="DIR", help=state_help)
    p.add_argument("--json", action="store_true", help="records and every event received")
    p.set_defaults(handler=cmd_machines)


MAX_STREAMS_ASKED = 64
MAX_RETRIES = 20
MAX_DEADLINE = 7 * 24 * 3600


def _between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} is not between {low} and {high}")
        return n

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    closed = guard_streams()
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    setup_logging(debug=debug)
    steady_memory()
    # `debug` comes from argv, as the verb's default overwrites `bootenv --debug VERB`'s
    # flag; a handler may turn it on later (the agent's bootenv.debug sets args.debug).
    args = argparse.Namespace(debug=False)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # --help, --version: printed, and flushed below
            code = exc.code if isinstance(exc.code, int) else 0
        else:
            if args.verb is None:
                raise UserError("a VERB is required", hint="see `bootenv --help`")
            handler: Handler = args.handler
            code = handler(args)
        sys.stdout.flush()  # here, where a closed pipe is reported as such
    except BootenvError as exc:
        if debug or args.debug:
            log.exception("failed")
        say(f"bootenv: error: {exc}")
        return exc.exit_code
    except TerminatedError:
        say("bootenv: terminated")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        say("bootenv: interrupted")
        return 130
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_broken():
            return output_lost()
        if debug or args.debug:
            log.exception("failed")
        say(f"bootenv: error: {_os_error(exc)}")
        return 1
    except Exception as exc:  # a bug: still one line, and the traceback with --debug
        if debug or args.debug:
            log.exception("internal error")
        hint = "" if debug or args.debug else " (hint: --debug shows where; please report it)"
        say(f"bootenv: error: internal error: {type(exc).__name__}: {_first_line(str(exc))}{hint}")
        return 1
    if closed is not None and closed.wrote and code == 0:
        return output_lost("stdout is closed")
    return code


def _os_error(exc: OSError) -> str:
    """`PATH: what went wrong`, not `[Errno N] ...`."""
    if exc.strerror is None:
        return str(exc)
    if exc.filename is None:
        return exc.strerror
    return f"{exc.filename}: {exc.strerror}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


class TerminatedError(KeyboardInterrupt):
    """SIGTERM (systemd stopping the unit, `kill`): the command stops as Ctrl-C stops it,
    cleaning up on the way, then ends by that signal (see `run`)."""


_TERMINATED = threading.Event()  # set by the handler: run() ends the process by SIGTERM


def _terminate(signum: int, frame: object) -> None:
    _TERMINATED.set()
    raise TerminatedError


def run() -> NoReturn:
    """The `bootenv` command: `main`, then end the process without tearing down the
    interpreter. Freeing every imported module's objects (requests and urllib3 above all)
    took about 70 ms of every bootenv process here, more than a layout's dpkg merge.
    Everything else a normal exit does still happens: the atexit functions run (logging's
    flush, multiprocessing's finalizers), then stdout and stderr are flushed, and a
    failed flush (a closed pipe) makes the exit code 120, as Python's own exit does. If a
    thread that a normal exit would wait for is still running, or `main` raises
    (SystemExit included), the exit takes the normal way. SIGTERM stops it as Ctrl-C
    does, and once it has cleaned up, the process ends by SIGTERM itself: a shell sees
    143, and systemd a clean stop (an exit status of 143 would mark the unit failed)."""
    signal.signal(signal.SIGTERM, _terminate)
    code = main()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    current = threading.current_thread()
    running = any(t is not current and not t.daemon for t in threading.enumerate())
    if running and not _TERMINATED.is_set():  # (terminated: not waited for)
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()  # main flushed it; an atexit function may have printed since
    except (OSError, ValueError):
        code = code or output_lost()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if _TERMINATED.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
    os._exit(code)
