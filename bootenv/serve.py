"""`bootenv serve`: images, the ramdisk, iPXE scripts and the callback endpoint over HTTP.

    GET  /images/<image>/<file>      static, with single-range support (206, 416), HEAD
    GET  /boot/[<build>/]vmlinuz     the ramdisk kernel and initramfs.img (--boot DIR), of
                                     the build named (bootenv/bootfiles.py) or the current
    GET  /ipxe/boot.ipxe             the entry script: chains to /ipxe/machine?mac=...
    GET  /ipxe/machine?mac=MAC       this machine's script: provision, local disk or menu
    GET  /ipxe/select/<entry>?mac=   a menu choice: assign the entry, then provision
    POST /callback/<mac>[/<id>]      a JSON event from the agent or the layout service (of
                                     the assignment with that id: another's get 409)
    GET  /api/machines[/<mac>]       the state store, as JSON (what `bootenv machines` shows)

Who answers what:

- here: `BootenvServer`, which holds the config, the state store and the catalog, makes
  each machine's script, records a menu choice and takes a callback's event into the
  store; `make_server`, `running` and `on_thread` start it.
- bootenv/endpoints.py: `Handler`, which routes each of these paths, reads a callback's
  event and lists the state store.
- bootenv/httpfiles.py: /images and /boot (ranges; no path resolves outside the served
  dirs).
- bootenv/httpconn.py: every connection's bounds (a thread each, socket timeouts, a
  request's head and body bounded in size and in time, connections capped).

For a rack of machines, serve /images and /boot from nginx and keep this for the scripts
and the state (docs/SERVE.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bootenv import bootfiles, ipxetext, menu
from bootenv.catalog import Catalog, CatalogError, load_catalog
from bootenv.endpoints import Handler
from bootenv.errors import UserError
from bootenv.event_schema import Event
from bootenv.httpconn import CappedServer
from bootenv.machines import INSTALLED, Machine, Mark, Outcome, State, assign
from bootenv.manifest import MANIFEST, MAX_MANIFEST, parse_manifest
from bootenv.smallfile import read_capped
from bootenv.state import Store, StoreFullError
from bootenv.urls import split_http_url

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes of one callback event


@dataclass(frozen=True)
class ServeConfig:
    images: Path
    state: Path
    host: str = "127.0.0.1"
    port: int = 8080
    boot: Path | None = None
    catalog: Path | None = None
    public_url: str | None = None  # the URL iPXE clients use to reach this server
    max_body: int = MAX_BODY


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `:8080` or `8080` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        version = ipaddress.ip_address(host).version
        number = int(port)
    except ValueError:
        raise UserError(f"--listen {text}: expected ADDRESS:PORT, e.g. 127.0.0.1:8080") from None
    if version != 4:
        # The server's socket is AF_INET, and the scripts' URLs would need the brackets.
        raise UserError(f"--listen {text}: serve listens on IPv4 only, e.g. 127.0.0.1:8080")
    if not 0 <= number <= 65535:
        raise UserError(f"--listen {text}: port out of range")
    return host, number


def check_reachable(config: ServeConfig) -> None:
    """Refuse to write a wildcard listen address into every script: iPXE clients and the
    ramdisk cannot reach 0.0.0.0, so the URLs need --public-url."""
    if config.public_url is None and ipaddress.ip_address(config.host).is_unspecified:
        raise UserError(
            f"--listen {config.host}:{config.port} is every address, which clients cannot reach: "
            f"pass --public-url http://ADDRESS:{config.port or 'PORT'}, this server's address for them"
        )


def check_public_url(url: str) -> str:
    """The base URL written into iPXE scripts and kernel arguments."""
    parts = split_http_url(url)
    if parts is None or parts.query or parts.fragment:
        raise UserError(f"--public-url {url}: expected http://HOST[:PORT][/PREFIX]")
    why = ipxetext.url_problem(url)
    if why is not None:
        raise UserError(f"--public-url {url!r} {why}: it goes into iPXE scripts")
    return url.rstrip("/")


MAX_MACHINES = 65536  # records; past it a machine nobody assigned makes none (callback, menu)


class BootenvServer(CappedServer):
    """`bootenv serve`: its config, the state store and the catalog; the script each
    machine gets, and the menu choices and callback events it records."""

    def __init__(self, config: ServeConfig) -> None:
        check_reachable(config)  # before anything is bound or written
        self.config = config
        self.store = Store(config.state)
        self._catalog_lock = threading.Lock()
        self._catalog = load_catalog(config.images, config.catalog)  # fail fast on a bad one
        super().__init__((config.host, config.port), Handler)
        host, port = str(self.server_address[0]), int(self.server_address[1])
        self.base_url = (config.public_url or f"http://{host}:{port}").rstrip("/")

    def catalog(self) -> Catalog:
        """The catalog, re-read on every menu so edits apply; a broken edit keeps the old one."""
        with self._catalog_lock:
            try:
                self._catalog = load_catalog(self.config.images, self.config.catalog)
            except (UserError, OSError) as exc:
                log.warning("catalog: %s; still serving the previous one", exc)
            return self._catalog

    def machine_script(self, mac: str) -> str:
        machine = self.store.get(mac)
        if machine is None or not machine.image:
            if machine is not None and machine.state in INSTALLED:
                return menu.local_script(mac, f"{mac} is {machine.state.value}")
            return menu.menu_script(self.catalog(), self.base_url, mac=mac)
        if machine.state in INSTALLED:
            return menu.local_script(mac, f"{mac} is provisioned ({machine.state.value})")
        if machine.state is State.FAILED:
            return menu.message_script(
                mac,
                f"provisioning {mac} failed: {_oneline(machine.error)}. Re-run bootenv assign to retry",
                wait=30,
            )
        problem = self._check_image(machine)
        if problem:
            return menu.message_script(mac, problem, wait=30)
        return menu.provision_script(self.boot_spec(machine))

    def boot_spec(self, machine: Machine) -> menu.BootSpec:
        image = machine.image
        if not image.startswith(("http://", "https://")):
            image = f"{self.base_url}/images/{image}"
        return menu.BootSpec(
            base_url=self.base_url,
            mac=machine.mac,
            image_url=image,
            components=machine.components,
            hostname=machine.hostname,
            kernel_args=machine.kernel_args,
            assignment=machine.assignment,
            build=bootfiles.current(self.config.boot) if self.config.boot is not None else None,
        )

    def _check_image(self, machine: Machine) -> str | None:
        """Why the machine's image cannot be provisioned, in words for its console: the
        image's name, never a path of the server's."""
        image = machine.image
        if image.startswith(("http://", "https://")):
            return None
        try:
            data = read_capped(self.config.images / image / MANIFEST, MAX_MANIFEST)
        except FileNotFoundError:
            return f"image {image} is not in the images directory"
        except OSError as exc:  # IMAGE a file, not a directory; no permission
            return f"image {image}: cannot read its {MANIFEST}: {exc.strerror or type(exc).__name__}"
        except UserError:  # read_capped: not a regular file
            return f"image {image}: its {MANIFEST} is not a regular file"
        try:
            manifest = parse_manifest(data)
            if machine.components not in ("all", "none"):
                for name in machine.components.split(","):
                    manifest.component(name)
        except UserError as exc:
            return f"image {image}: {_oneline(exc.message)}"
        return None

    def select(self, entry_id: str, mac: str) -> str:
        """A menu choice: record it as the assignment (unless one exists), then provision."""
        if _open_to_menu(self.store.get(mac)):
            try:
                entry = self.catalog().entry(entry_id)
            except CatalogError as exc:
                return menu.message_script(mac, exc.message)
            machine = assign(
                mac, entry.image, entry.components, now=_now(), entry=entry.id, kernel_args=entry.kernel_args
            )
            # Checked again under the machine's lock: an admin may have assigned it while
            # the catalog was read, and an admin's assignment wins.
            note = {"received": _now(), "event": "assigned", "entry": entry.id}
            try:
                chosen = self.store.put(machine, note=note, only_if=_open_to_menu, limit=MAX_MACHINES)
            except StoreFullError as exc:
                log.warning("%s chose %r from the menu: %s", mac, entry.title, exc.message)
                return menu.message_script(mac, f"cannot record this choice: {exc.message}", wait=30)
            if chosen:
                log.info("%s chose %r from the menu", mac, entry.title)
        return self.machine_script(mac)

    def take_event(self, mac: str, event: Event, doc: dict[str, Any], assignment: str | None) -> Outcome:
        """A callback's event, into the machine's record (StoreFullError, SupersededError)."""
        # Each machine nobody assigned that posts is a record and a log: bounded.
        return self.store.update(
            mac, event, doc, create=_unknown_machine, assignment=assignment, limit=MAX_MACHINES
        )


def _now() -> float:
    return time.time()


def _open_to_menu(machine: Machine | None) -> bool:
    """Whether a menu choice may assign this machine: nobody assigned or provisioned it."""
    return machine is None or (not machine.image and machine.state not in INSTALLED)


def _oneline(text: str | None) -> str:
    """Free text (an agent's error message: anyone may post one) for an iPXE echo line."""
    return ipxetext.scrub(text or "unknown error")


def _unknown_machine(mac: str, now: float) -> Machine:
    """A callback from a machine nobody assigned (booted by hand): track it anyway."""
    return Machine(mac, "", "", State.ASSIGNED, (Mark(State.ASSIGNED, now),), updated=now)


def make_server(config: ServeConfig) -> BootenvServer:
    if not config.images.is_dir():
        raise UserError(f"--images {config.images} is not a directory")
    if config.boot is not None:
        for name in (menu.RAMDISK_KERNEL, menu.RAMDISK_INITRD):
            if not (config.boot / name).is_file():
                log.warning("--boot %s has no %s: assigned machines will not boot", config.boot, name)
        build = bootfiles.noted(config.boot)
        if build is not None and not bootfiles.complete(config.boot, build):
            log.warning(
                "--boot %s lacks build %s, its note's: scripts will name no build", config.boot, build
            )
    try:
        server = BootenvServer(config)
    except OSError as exc:
        raise UserError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    if not ipaddress.ip_address(config.host).is_loopback:
        log.warning("listening on %s: anyone on that network can read the state and post events", config.host)
    return server


@contextlib.contextmanager
def running(config: ServeConfig) -> Iterator[BootenvServer]:
    """A server answering in a background thread, stopped on exit (tests, `make demo`)."""
    with on_thread(make_server(config)) as server:
        yield server


_Server = TypeVar("_Server", bound=socketserver.BaseServer)


@contextlib.contextmanager
def on_thread(server: _Server) -> Iterator[_Server]:
    """`server` answering on a thread of its own for the block; then shut down, its socket
    closed and its thread joined (the one way a server runs beside other work: `running`,
    the tests' servers and the benchmarks')."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
