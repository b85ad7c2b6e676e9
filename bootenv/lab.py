"""A netboot lab on one host: a signed LAMP image, the ramdisk, `bootenv serve` on
127.0.0.1, QEMU's TFTP serving iPXE's chainload script, and VMs that netboot from it.

Used by `make demo` and the VM tests. Everything is a context manager; the images and
the ramdisk are cached in ~/.cache/bootenv by their inputs.
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
from bootenv.machines import Machine, State
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


def _code_key() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def prepare_image(images: Path) -> str:
    """Capture and sign the LAMP gold image (cached); return the signer's fingerprint."""
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
        fp = fingerprint(read_public_key(key.with_name(key.name + ".pub")))
        stamp = images / f".{IMAGE}.source"
        wanted = input_key({"gold": gold.name, "code": _code_key()})
        if not stamp.exists() or stamp.read_text() != wanted:
            specs = tuple(parse_component_arg(c) for c in COMPONENTS)
            capture(CaptureConfig(root=gold, output=out, components=specs, force=True))
            (out / SIGNATURE).write_bytes(sign((out / "manifest.json").read_bytes(), key))
            stamp.write_text(wanted)
        (images / "catalog.json").write_text(json.dumps(_catalog(fp), indent=2) + "\n")
    return fp


def _catalog(fp: str) -> dict[str, Any]:
    """The boot menu the admin declared: three LAMP combinations, MySQL by default."""
    args = f"bootenv.trust={fp}"

    def entry(eid: str, title: str, comps: list[str] | str) -> dict[str, Any]:
        return {"id": eid, "title": title, "image": IMAGE, "components": comps, "kernel_args": args}

    return {
        "title": "bootenv lab",
        "timeout": MENU_TIMEOUT,
        "default": MENU_DEFAULT,
        "entries": [
            entry("lamp-mysql", "LAMP: OS + MySQL", ["mysql"]),
            entry("lamp-web", "LAMP: OS + Apache + PHP", ["apache", "php"]),
            entry("lamp-all", "LAMP: all", "all"),
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


def follow(
    store: Store,
    mac: str,
    vm: Vm,
    *,
    timeout: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Machine:
    """Wait until the machine is done or failed, handing each new event to `on_event`."""
    seen = 0
    deadline = time.monotonic() + timeout
    while True:
        events = store.events(mac)
        for ev in events[seen:]:
            if on_event is not None:
                on_event(ev)
        seen = len(events)
        machine = store.get(mac)
        if machine is not None and machine.state in (State.DONE, State.FAILED):
            return machine
        if not vm.alive():
            raise FatalError(f"the VM stopped before provisioning finished: {_last_line(vm.console())}")
        if time.monotonic() > deadline:
            raise FatalError(
                f"provisioning did not finish within {timeout:.0f} s: {_last_line(vm.console())}"
            )
        time.sleep(1.0)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no console output"
