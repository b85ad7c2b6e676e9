"""`make demo`: netboot a QEMU VM through real iPXE and provision it from a LAMP image.

1. build (or reuse) the gold machine and capture it, signed with a demo key;
2. build (or reuse) the ramdisk, start `bootenv serve` on 127.0.0.1;
3. assign the VM's MAC, netboot it (-boot n, QEMU's TFTP, HTTP to the server);
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

from bootenv.errors import BootenvError
from bootenv.lab import IMAGE, follow, lab, new_disk, vm_spec
from bootenv.log import setup_logging
from bootenv.machines import Machine, State, assign
from bootenv.manifest import Manifest, parse_manifest, resolve_components
from bootenv.qemu import Vm, free_port
from bootenv.state import Store

log = logging.getLogger(__name__)

MAC = "52:54:00:be:e7:01"


@dataclass(frozen=True)
class DemoConfig:
    components: str = "all"
    firmware: Literal["bios", "uefi"] = "bios"
    timeout: float = 1800.0


def run_demo(cfg: DemoConfig) -> int:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bootenv-demo-")))
        the_lab = stack.enter_context(lab(work))
        the_lab.store.put(
            assign(
                MAC,
                IMAGE,
                cfg.components,
                now=time.time(),
                hostname="demo-web1",
                kernel_args=the_lab.trust_args(),
            )
        )
        http_port, sql_port = free_port(), free_port()
        spec = vm_spec(
            the_lab,
            "demo",
            new_disk(work / "disk.img"),
            mac=MAC,
            firmware=cfg.firmware,
            hostfwd=((http_port, 80), (sql_port, 3306)),
        )
        t0 = time.time()
        vm = stack.enter_context(Vm(spec))
        print(f"VM {MAC} netbooting ({cfg.firmware}); components: {cfg.components}", flush=True)

        def show(ev: dict[str, Any]) -> None:
            print(f"  +{float(ev.get('received', t0)) - t0:7.1f}s  {_describe(ev)}", flush=True)

        machine = follow(the_lab.store, MAC, vm, timeout=cfg.timeout, on_event=show)
        print(report(the_lab.store, machine, t0))
        ok = machine.state is State.DONE
        if ok:
            manifest = parse_manifest((the_lab.images / IMAGE / "manifest.json").read_bytes())
            ok = check_services(chosen(manifest, machine.components), http_port, sql_port)
        if not ok:
            print("console log tail:\n" + "\n".join(vm.console().splitlines()[-25:]), file=sys.stderr)
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


def report(store: Store, machine: Machine, t0: float) -> str:
    """The final table: time to each milestone after power-on, and the conflicts."""
    rows = [("milestone", "seconds after power-on")]
    for state, label in (
        (State.PROVISIONING, "agent running (PXE done)"),
        (State.OS_WRITTEN, "OS written"),
        (State.OS_BOOTED, "OS booted"),
    ):
        at = machine.reached(state)
        rows.append((label, f"{at - t0:.1f}" if at else "-"))
    for ev in store.events(machine.mac):
        if ev.get("source") == "layout" and ev.get("step") == "component" and ev.get("status") == "done":
            rows.append((f"component {ev['component']} ready", f"{float(ev['received']) - t0:.1f}"))
    done = machine.reached(State.DONE)
    rows.append(("total (done)", f"{done - t0:.1f}" if done else "-"))
    rows.append(("conflicts", str(machine.conflicts)))
    if machine.error:
        rows.append(("error", machine.error))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines.insert(1, "-" * (width + 2 + len(rows[0][1])))
    return "\n".join(lines)


def check_services(components: list[str], http_port: int, sql_port: int) -> bool:
    """Ask the VM's services, through QEMU's 127.0.0.1 forwards."""
    import requests

    checks: list[tuple[str, Callable[[], bool]]] = []
    if "apache" in components:
        path, want = ("/info.php", "bootenv gold") if "php" in components else ("/", "")
        url = f"http://127.0.0.1:{http_port}{path}"
        checks.append((f"HTTP GET {path}", lambda: want in requests.get(url, timeout=5).text))
    if "mysql" in components:
        checks.append(("MariaDB handshake", lambda: b"MariaDB" in greeting(sql_port)))
    results = [(name, retry(check)) for name, check in checks]
    for name, ok in results:
        print(f"service check: {name}: {'ok' if ok else 'FAILED'}")
    return all(ok for _, ok in results)


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
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    setup_logging(debug=args.debug)
    try:
        return run_demo(DemoConfig(components=args.components, firmware=args.firmware, timeout=args.timeout))
    except BootenvError as exc:
        if args.debug:
            log.exception("demo failed")
        print(f"bootenv demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
