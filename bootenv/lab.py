"""A netboot lab on one host: a signed LAMP image, the ramdisk, `bootenv serve` on
127.0.0.1, QEMU's TFTP serving iPXE's chainload script, and VMs that netboot from it.

Used by `make demo`, the VM tests and the QEMU timeline benchmark (bench/timeline.py).
Everything is a context manager; the images and the ramdisk are cached in
~/.cache/bootenv by their inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bootenv.cache import cache_root, input_key, locked
from bootenv.errors import FatalError
from bootenv.log import step
from bootenv.machines import Machine, State, assign
from bootenv.qemu import Vm, VmSpec, free_port, ovmf_code
from bootenv.state import Store

log = logging.getLogger(__name__)

IMAGE = "lamp"
COMPONENTS = ("apache=apache2", "mysql=mariadb-server", "php=php,libapache2-mod-php,php-mysql")
EMBED = Path(__file__).resolve().parent.parent / "ipxe" / "embed.ipxe"
EMBED_URL = "http://192.0.2.10:8080"  # the placeholder in ipxe/embed.ipxe
GUEST_HOST = "10.0.2.2"  # the host's loopback as QEMU's user network shows it to the guest
MENU_TIMEOUT = 3  # seconds before the menu boots its default
MENU_DEFAULT = "lamp-mysql"
SINGLE_ARG = "bootenv.single=1"  # the agent writes the classic one-piece image


@dataclass(frozen=True)
class Lab:
    work: Path
    images: Path
    store: Store
    port: int
    fingerprint: str  # the demo signing key, pinned on the ramdisk's kernel command line
    tftp: Path

    @property
    def guest_url(self) -> str:
        return f"http://{GUEST_HOST}:{self.port}"

    def trust_args(self) -> str:
        return f"bootenv.trust={self.fingerprint}"

    def kernel_args(self, *, single: bool = False) -> str:
        return f"{self.trust_args()} {SINGLE_ARG}" if single else self.trust_args()


def _code_key() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def prepare_image(images: Path) -> str:
    """Capture and sign the LAMP gold image, with its single image (cached); return the
    signer's fingerprint."""
    from bootenv.capture import CaptureConfig, capture
    from bootenv.gold import gold_tree
    from bootenv.signing import ensure_key, fingerprint, read_public_key, write_signature
    from bootenv.split import parse_component_arg

    gold = gold_tree()
    key = cache_root() / "demo" / "signing-key"
    out = images / IMAGE
    with locked("demo-image"):
        ensure_key(key)
        fp = fingerprint(read_public_key(key.with_name(key.name + ".pub")))
        stamp = images / f".{IMAGE}.source"
        wanted = input_key({"gold": gold.name, "code": _code_key()})
        if not stamp.exists() or stamp.read_text() != wanted:
            specs = tuple(parse_component_arg(c) for c in COMPONENTS)
            capture(CaptureConfig(root=gold, output=out, components=specs, single=True, force=True))
            write_signature(out, (out / "manifest.json").read_bytes(), key)
            stamp.write_text(wanted)
        (images / "catalog.json").write_text(json.dumps(_catalog(fp), indent=2) + "\n")
    return fp


def _catalog(fp: str) -> dict[str, Any]:
    """The boot menu the admin declared: three LAMP combinations, MySQL by default, and
    the same LAMP machine from its single image."""
    args = f"bootenv.trust={fp}"

    def entry(eid: str, title: str, comps: list[str] | str, extra: str = "") -> dict[str, Any]:
        kargs = f"{args} {extra}" if extra else args
        return {"id": eid, "title": title, "image": IMAGE, "components": comps, "kernel_args": kargs}

    return {
        "title": "bootenv lab",
        "timeout": MENU_TIMEOUT,
        "default": MENU_DEFAULT,
        "entries": [
            entry("lamp-mysql", "LAMP: OS + MySQL", ["mysql"]),
            entry("lamp-web", "LAMP: OS + Apache + PHP", ["apache", "php"]),
            entry("lamp-all", "LAMP: all", "all"),
            entry("lamp-single", "LAMP: all, from the single image", "all", SINGLE_ARG),
        ],
    }


@contextmanager
def lab(work: Path) -> Iterator[Lab]:
    """The image, the ramdisk and a running `bootenv serve`; stopped on exit."""
    from bootenv.ramdisk import build_ramdisk
    from bootenv.serve import ServeConfig, running

    images = cache_root() / "demo" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with step("Preparing the LAMP gold image"):
        fp = prepare_image(images)
    with step("Preparing the ramdisk"):
        ramdisk = build_ramdisk()
    port = free_port()
    tftp = work / "tftp"
    tftp.mkdir(exist_ok=True)
    config = ServeConfig(
        images=images,
        state=work / "state",
        port=port,
        boot=ramdisk.vmlinuz.parent,
        public_url=f"http://{GUEST_HOST}:{port}",
    )
    with running(config):
        the_lab = Lab(work, images, Store(work / "state"), port, fp, tftp)
        # iPXE's chainload script, pointed at this server, is the TFTP boot file.
        (tftp / "boot.ipxe").write_text(EMBED.read_text().replace(EMBED_URL, the_lab.guest_url))
        log.info("bootenv serve on http://127.0.0.1:%d (the VM sees %s)", port, the_lab.guest_url)
        yield the_lab


def new_disk(path: Path, gigabytes: int = 8) -> Path:
    with open(path, "wb") as f:
        f.truncate(gigabytes << 30)
    return path


def vm_spec(
    the_lab: Lab,
    name: str,
    disk: Path,
    *,
    mac: str,
    firmware: Literal["bios", "uefi"] = "bios",
    netboot: bool = True,
    hostfwd: tuple[tuple[int, int], ...] = (),
) -> VmSpec:
    uefi_vars = None
    if firmware == "uefi":
        uefi_vars = the_lab.work / f"{name}-OVMF_VARS.fd"
        shutil.copy(ovmf_code()[1], uefi_vars)
    return VmSpec(
        console_log=the_lab.work / f"{name}-console.log",
        disk=disk,
        netboot=netboot,
        tftp_dir=the_lab.tftp if netboot else None,
        bootfile="boot.ipxe" if netboot else None,
        mac=mac,
        hostfwd=hostfwd,
        firmware=firmware,
        uefi_vars=uefi_vars,
    )


@dataclass(frozen=True)
class Provisioned:
    """One netboot run: the machine's final record and its VM, still running."""

    machine: Machine
    vm: Vm
    t0: float  # epoch seconds at power-on
    http_port: int  # 127.0.0.1 ports QEMU forwards to the guest's 80 and 3306
    sql_port: int


@contextmanager
def provision(
    the_lab: Lab,
    name: str,
    mac: str,
    components: str,
    *,
    single: bool = False,
    firmware: Literal["bios", "uefi"] = "bios",
    hostname: str | None = None,
    timeout: float,
    on_event: Callable[[float, dict[str, Any]], None] | None = None,
) -> Iterator[Provisioned]:
    """Assign `mac`, power on a fresh VM that netboots, and follow it to done or failed.

    `on_event` gets each event with its time in seconds after power-on. The VM keeps
    running inside the block (to check its services) and is killed on exit.
    """
    the_lab.store.put(
        assign(
            mac,
            IMAGE,
            components,
            now=time.time(),
            hostname=hostname,
            kernel_args=the_lab.kernel_args(single=single),
        )
    )
    http_port, sql_port = free_port(), free_port()
    spec = vm_spec(
        the_lab,
        name,
        new_disk(the_lab.work / f"{name}.img"),
        mac=mac,
        firmware=firmware,
        hostfwd=((http_port, 80), (sql_port, 3306)),
    )
    t0 = time.time()

    def relative(ev: dict[str, Any]) -> None:
        if on_event is not None:
            on_event(float(ev.get("received", t0)) - t0, ev)

    with Vm(spec) as vm:
        machine = follow(the_lab.store, mac, vm, timeout=timeout, on_event=relative)
        yield Provisioned(machine, vm, t0, http_port, sql_port)


@dataclass(frozen=True)
class Timeline:
    """Seconds after power-on at which a machine reached each milestone (None: never)."""

    agent: float | None  # the agent is up: DHCP, iPXE and the ramdisk's boot are behind
    written: float | None  # the OS (or single) image is on the disk, verified (write-os done)
    bootable: float | None  # the disk boots: grown, configured, grub in, synced (os_written)
    os_booted: float | None  # the installed OS runs (its layout service started)
    components: tuple[tuple[str, float], ...]  # each component laid out, in order
    done: float | None


def timeline(store: Store, machine: Machine, t0: float) -> Timeline:
    def at(state: State) -> float | None:
        mark = machine.reached(state)
        return mark - t0 if mark else None

    events = store.events(machine.mac)
    comps = tuple(
        (str(ev["component"]), float(ev["received"]) - t0)
        for ev in events
        if ev.get("source") == "layout" and ev.get("step") == "component" and ev.get("status") == "done"
    )
    # The write-os step's end moves no state (the disk cannot boot yet): its event says when.
    written = next(
        (
            float(ev["received"]) - t0
            for ev in events
            if ev.get("source", "agent") == "agent"
            and ev.get("step") == "write-os"
            and ev.get("status") == "done"
        ),
        None,
    )
    return Timeline(
        at(State.PROVISIONING), written, at(State.OS_WRITTEN), at(State.OS_BOOTED), comps, at(State.DONE)
    )


def follow(
    store: Store,
    mac: str,
    vm: Vm,
    *,
    timeout: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    until: State = State.DONE,
) -> Machine:
    """Wait until the machine has reached `until` (by default: done) or failed, handing
    each new event to `on_event`."""
    seen = 0
    deadline = time.monotonic() + timeout
    while True:
        events = store.events(mac)
        for ev in events[seen:]:
            if on_event is not None:
                on_event(ev)
        seen = len(events)
        machine = store.get(mac)
        if machine is not None and (machine.state is State.FAILED or machine.reached(until)):
            return machine
        if not vm.alive():
            raise FatalError(f"the VM stopped before the machine was {until}: {_last_line(vm.console())}")
        if time.monotonic() > deadline:
            raise FatalError(
                f"the machine was not {until} within {timeout:.0f} s: {_last_line(vm.console())}"
            )
        time.sleep(1.0)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no console output"
