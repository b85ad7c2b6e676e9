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

from bootenv.cache import cache_root, input_key, locked
from bootenv.errors import BootenvError, FatalError
from bootenv.log import setup_logging, step
from bootenv.machines import Machine, State, assign
from bootenv.qemu import Vm, VmSpec, free_port
from bootenv.state import Store

log = logging.getLogger(__name__)

MAC = "52:54:00:be:e7:01"
IMAGE = "lamp"
COMPONENTS = ("apache=apache2", "mysql=mariadb-server", "php=php,libapache2-mod-php,php-mysql")
EMBED = Path(__file__).resolve().parent.parent / "ipxe" / "embed.ipxe"
GUEST = "10.0.2.2"  # the host's loopback as QEMU's user network shows it to the guest


@dataclass(frozen=True)
class DemoConfig:
    components: str = "all"
    firmware: str = "bios"
    timeout: float = 1800.0
    disk_gb: int = 8


def prepare_image(images: Path) -> tuple[Path, str]:
    """The captured LAMP image, signed; returns (image dir, signer fingerprint)."""
    from bootenv.capture import CaptureConfig, capture
    from bootenv.gold import gold_tree
    from bootenv.signing import SIGNATURE, fingerprint, keygen, read_public_key, sign
    from bootenv.split import parse_component_arg

    gold = gold_tree()
    key = cache_root() / "demo" / "signing-key"
    out = images / IMAGE
    with locked("demo-image"):
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            keygen(key)
        stamp = out / ".source"
        wanted = input_key({"gold": gold.name, "code": _code_key()})
        if not stamp.exists() or stamp.read_text() != wanted:
            specs = tuple(parse_component_arg(c) for c in COMPONENTS)
            capture(CaptureConfig(root=gold, output=out, components=specs, force=True))
            (out / SIGNATURE).write_bytes(sign((out / "manifest.json").read_bytes(), key))
            stamp.write_text(wanted)
    return out, fingerprint(read_public_key(key.with_name(key.name + ".pub")))


def _code_key() -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_demo(cfg: DemoConfig) -> int:
    from bootenv.ramdisk import build_ramdisk
    from bootenv.serve import ServeConfig, running

    images = cache_root() / "demo" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with step("Preparing the LAMP gold image"):
        _, fp = prepare_image(images)
    with step("Preparing the ramdisk"):
        ramdisk = build_ramdisk()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bootenv-demo-")))
        port = free_port()
        base = f"http://{GUEST}:{port}"
        server = stack.enter_context(
            running(
                ServeConfig(
                    images=images,
                    state=work / "state",
                    port=port,
                    boot=ramdisk.vmlinuz.parent,
                    public_url=base,
                )
            )
        )
        log.info("bootenv serve on http://127.0.0.1:%d (the VM sees %s)", server.server_address[1], base)
        store = Store(work / "state")
        store.put(
            assign(
                MAC,
                IMAGE,
                cfg.components,
                now=time.time(),
                hostname="demo-web1",
                kernel_args=f"bootenv.trust={fp}",
            )
        )
        tftp = work / "tftp"
        tftp.mkdir()
        script = EMBED.read_text().replace("http://192.0.2.10:8080", base)
        (tftp / "boot.ipxe").write_text(script)
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(cfg.disk_gb << 30)
        http_port, sql_port = free_port(), free_port()
        spec = VmSpec(
            console_log=work / "console.log",
            disk=disk,
            netboot=True,
            tftp_dir=tftp,
            bootfile="boot.ipxe",
            mac=MAC,
            hostfwd=((http_port, 80), (sql_port, 3306)),
            firmware="uefi" if cfg.firmware == "uefi" else "bios",
            uefi_vars=_uefi_vars(work) if cfg.firmware == "uefi" else None,
        )
        t0 = time.time()
        vm = stack.enter_context(Vm(spec))
        print(f"VM {MAC} netbooting ({cfg.firmware}); components: {cfg.components}", flush=True)
        machine = _follow(store, vm, t0, cfg.timeout)
        ok = machine.state is State.DONE
        print(_report(store, machine, t0))
        if ok:
            ok = _check_services(store, machine.components, http_port, sql_port)
        if not ok:
            print(f"console log tail:\n{_tail(vm.console())}", file=sys.stderr)
        return 0 if ok else 1


def _uefi_vars(work: Path) -> Path:
    import shutil

    from bootenv.qemu import ovmf_code

    dest = work / "OVMF_VARS.fd"
    shutil.copy(ovmf_code()[1], dest)
    return dest


def _follow(store: Store, vm: Vm, t0: float, timeout: float) -> Machine:
    seen = 0
    deadline = time.time() + timeout
    while True:
        events = store.events(MAC)
        for ev in events[seen:]:
            print(f"  +{ev.get('received', t0) - t0:7.1f}s  {_describe(ev)}", flush=True)
        seen = len(events)
        machine = store.get(MAC)
        if machine is not None and machine.state in (State.DONE, State.FAILED):
            return machine
        if not vm.alive():
            raise FatalError(f"the VM stopped before provisioning finished: {_tail(vm.console(), 1)}")
        if time.time() > deadline:
            raise FatalError(f"provisioning did not finish within {timeout:.0f} s")
        time.sleep(1.0)


def _describe(ev: dict[str, object]) -> str:
    parts = [str(ev.get("source", "")), str(ev.get("event", ""))]
    for key in ("component", "step", "status"):
        if ev.get(key):
            parts.append(str(ev[key]))
    if isinstance(ev.get("elapsed"), int | float):
        parts.append(f"({ev['elapsed']:.1f} s)")
    if ev.get("message"):
        parts.append(f"- {ev['message']}")
    return " ".join(parts)


def _report(store: Store, machine: Machine, t0: float) -> str:
    rows = [("milestone", "seconds after power-on")]
    for state in (State.PROVISIONING, State.OS_WRITTEN, State.OS_BOOTED):
        at = machine.reached(state)
        rows.append((f"{state.value}", f"{at - t0:.1f}" if at else "-"))
    for ev in store.events(MAC):
        if ev.get("source") == "layout" and ev.get("component") and ev.get("status") == "done":
            rows.append((f"component {ev['component']} ready", f"{float(str(ev['received'])) - t0:.1f}"))
    done = machine.reached(State.DONE)
    rows.append(("total (done)", f"{done - t0:.1f}" if done else "-"))
    rows.append(("conflicts", str(machine.conflicts)))
    if machine.error:
        rows.append(("error", machine.error))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines.insert(1, "-" * (width + 2 + len(rows[0][1])))
    return "\n".join(lines)


def _check_services(store: Store, components: str, http_port: int, sql_port: int) -> bool:
    """Ask the VM's services, through QEMU's 127.0.0.1 forwards."""
    import requests

    from bootenv.manifest import parse_manifest, resolve_components

    manifest = parse_manifest((cache_root() / "demo" / "images" / IMAGE / "manifest.json").read_bytes())
    chosen, _ = resolve_components(
        manifest, "all" if components == "all" else [] if components == "none" else components.split(",")
    )
    checks: list[tuple[str, bool]] = []
    if "apache" in chosen:
        path = "/info.php" if "php" in chosen else "/"
        want = "bootenv gold" if "php" in chosen else ""
        checks.append(
            (
                f"http GET {path}",
                _retry(lambda: want in requests.get(f"http://127.0.0.1:{http_port}{path}", timeout=5).text),
            )
        )
    if "mysql" in chosen:
        checks.append(("mariadb handshake", _retry(lambda: b"MariaDB" in _greeting(sql_port))))
    for name, ok in checks:
        print(f"service check: {name}: {'ok' if ok else 'FAILED'}")
    return all(ok for _, ok in checks)


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(256)


def _retry(check: Callable[[], bool], attempts: int = 30) -> bool:
    for _ in range(attempts):
        try:
            if check():
                return True
        except (OSError, ValueError) as exc:
            log.debug("service check: %s", exc)
        time.sleep(2)
    return False


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.splitlines()[-n:])


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
