"""`make demo`: netboot a QEMU VM through real iPXE and provision it from a LAMP image.

1. build (or reuse) the gold machine and capture it, signed with a demo key;
2. build (or reuse) the ramdisk, start `bootenv serve` on 127.0.0.1;
3. assign the VM's MAC, netboot it (-boot n, QEMU's TFTP, HTTP to the server);
   with --single the agent writes the classic one-piece image instead of the split one;
4. print the live timeline, then a table of timings, and check the services answer.
Everything started here is stopped on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bootenv.errors import BootenvError, UserError
from bootenv.lab import IMAGE, Timeline, lab, provision, timeline
from bootenv.log import setup_logging
from bootenv.machines import Machine, State
from bootenv.manifest import Manifest, parse_manifest, resolve_components

log = logging.getLogger(__name__)

MAC = "52:54:00:be:e7:01"


@dataclass(frozen=True)
class DemoConfig:
    components: str = "all"
    firmware: Literal["bios", "uefi"] = "bios"
    timeout: float = 1800.0
    single: bool = False  # write the single image (it holds every component)


def run_demo(cfg: DemoConfig) -> int:
    if cfg.single and cfg.components != "all":
        raise UserError("--single writes every component: leave --components at all")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bootenv-demo-")))
        the_lab = stack.enter_context(lab(work))
        what = "single image (all components)" if cfg.single else f"components: {cfg.components}"
        print(f"VM {MAC} netbooting ({cfg.firmware}); {what}", flush=True)

        def show(seconds: float, ev: dict[str, Any]) -> None:
            print(f"  +{seconds:7.1f}s  {_describe(ev)}", flush=True)

        run = stack.enter_context(
            provision(
                the_lab,
                "demo",
                MAC,
                cfg.components,
                single=cfg.single,
                firmware=cfg.firmware,
                hostname="demo-web1",
                timeout=cfg.timeout,
                on_event=show,
            )
        )
        machine = run.machine
        print(report(timeline(the_lab.store, machine, run.t0), machine))
        ok = machine.state is State.DONE
        if ok:
            manifest = parse_manifest((the_lab.images / IMAGE / "manifest.json").read_bytes())
            ok = check_services(chosen(manifest, machine.components), run.http_port, run.sql_port)
        if not ok:
            print("console log tail:\n" + "\n".join(run.vm.console().splitlines()[-25:]), file=sys.stderr)
        return 0 if ok else 1


def chosen(manifest: Manifest, components: str) -> list[str]:
    wanted: str | list[str] = components if components in ("all", "none") else components.split(",")
    return resolve_components(manifest, wanted)[0]


def _describe(ev: dict[str, Any]) -> str:
    parts = [str(ev.get("source", "")), str(ev.get("event", ""))]
    parts += [str(ev[k]) for k in ("component", "step", "status") if ev.get(k)]
    if isinstance(ev.get("elapsed"), int | float):
        parts.append(f"({ev['elapsed']:.1f} s)")
    if ev.get("message"):
        parts.append(f"- {ev['message']}")
    return " ".join(parts)


def report(tl: Timeline, machine: Machine) -> str:
    """The final table: time to each milestone after power-on, and the conflicts."""

    def secs(at: float | None) -> str:
        return f"{at:.1f}" if at is not None else "-"

    rows = [("milestone", "seconds after power-on")]
    rows.append(("agent running (PXE done)", secs(tl.agent)))
    rows.append(("OS written", secs(tl.written)))
    rows.append(("disk bootable", secs(tl.bootable)))
    rows.append(("OS booted", secs(tl.os_booted)))
    rows += [(f"component {name} ready", secs(at)) for name, at in tl.components]
    rows.append(("total (done)", secs(tl.done)))
    rows.append(("conflicts", str(machine.conflicts)))
    if machine.error:
        rows.append(("error", machine.error))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines.insert(1, "-" * (width + 2 + len(rows[0][1])))
    return "\n".join(lines)


def check_services(components: list[str], http_port: int, sql_port: int) -> bool:
    """Ask the VM's services, through QEMU's 127.0.0.1 forwards, and print the answers."""
    results = [(name, retry(check)) for name, check in service_checks(components, http_port, sql_port)]
    for name, ok in results:
        print(f"service check: {name}: {'ok' if ok else 'FAILED'}")
    return all(ok for _, ok in results)


def service_checks(
    components: list[str], http_port: int, sql_port: int
) -> list[tuple[str, Callable[[], bool]]]:
    """One check per service the chosen components bring: (name, does it answer)."""
    import requests

    checks: list[tuple[str, Callable[[], bool]]] = []
    if "apache" in components:
        path, want = ("/info.php", "bootenv gold") if "php" in components else ("/", "")
        url = f"http://127.0.0.1:{http_port}{path}"
        checks.append((f"HTTP GET {path}", lambda: want in requests.get(url, timeout=5).text))
    if "mysql" in components:
        checks.append(("MariaDB handshake", lambda: b"MariaDB" in greeting(sql_port)))
    return checks


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(256)


def retry(check: Callable[[], bool], attempts: int = 30) -> bool:
    for _ in range(attempts):
        try:
            if check():
                return True
        except (OSError, ValueError) as exc:
            log.debug("service check: %s", exc)
        time.sleep(2)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bootenv-demo", description=__doc__)
    p.add_argument("--components", default="all", help="a,b | all | none (default: all)")
    p.add_argument("--firmware", choices=("bios", "uefi"), default="bios")
    p.add_argument("--single", action="store_true", help="write the single image (every component)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    setup_logging(debug=args.debug)
    try:
        return run_demo(
            DemoConfig(
                components=args.components, firmware=args.firmware, timeout=args.timeout, single=args.single
            )
        )
    except BootenvError as exc:
        if args.debug:
            log.exception("demo failed")
        print(f"bootenv demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
