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

One thread per connection, so a slow client never blocks another; every socket has a
timeout, a request's head and body are bounded in size and in time, connections are
capped, and no path resolves outside the served dirs. For
a rack of machines, serve /images and /boot from nginx and keep this for the scripts
and the state (docs/SERVE.md).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from bootenv import bootfiles, ipxetext, menu
from bootenv.catalog import Catalog, CatalogError, load_catalog
from bootenv.errors import UserError
from bootenv.httpfiles import UnsatisfiableError, parse_range, resolve_under
from bootenv.machines import (
    FINAL,
    INSTALLED,
    EventError,
    Machine,
    Mark,
    State,
    assign,
    check_assignment,
    normalize_mac,
    parse_event,
    to_dict,
)
from bootenv.manifest import MANIFEST, MAX_MANIFEST, parse_manifest
from bootenv.smallfile import read_capped
from bootenv.state import Damaged, Store, StoreFullError, SupersededError
from bootenv.urls import split_http_url

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes of one callback event
CLIENT_TIMEOUT = 60.0  # seconds a client may stay silent mid-request
HEAD_LIMIT = 32 * 1024  # bytes of one request's line and headers (nginx: 4 x 8 KiB)
HEAD_TIMEOUT = 60.0  # seconds to send a request's line and headers, or a callback's body
MAX_CONNECTIONS = 256  # open at once; more get 503 (each holds a thread)
_LENGTH = re.compile(r"[0-9]{1,10}")
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
)


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
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise UserError(f"--listen {text}: expected ADDRESS:PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= number <= 65535:
        raise UserError(f"--listen {text}: port out of range")
    return host, number


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
API_EVENTS = 1 << 20  # bytes of a machine's events log /api/machines/MAC answers with


class BootenvServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a rack powering on at once
    block_on_close = False

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = Store(config.state)
        self.deadlines = _Deadlines()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._catalog_lock = threading.Lock()
        self._catalog = load_catalog(config.images, config.catalog)  # fail fast on a bad one
        super().__init__((config.host, config.port), Handler)
        host, port = str(self.server_address[0]), int(self.server_address[1])
        self.base_url = (config.public_url or f"http://{host}:{port}").rstrip("/")

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to MAX_CONNECTIONS; past that, 503 at once."""
        if not self._slots.acquire(blocking=False):
            log.debug("%s: %d connections open, answering 503", client_address, MAX_CONNECTIONS)
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.clear(request)
            self._slots.release()

    def service_actions(self) -> None:
        """Between polls of the listening socket: drop connections past their deadline."""
        self.deadlines.reap()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a layout done with its keep-alive connection, an agent
        that rebooted) is routine, logged at debug level; anything else is a bug, logged
        with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException)):
            log.debug("%s: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)

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


def _now() -> float:
    return time.time()


def _open_to_menu(machine: Machine | None) -> bool:
    """Whether a menu choice may assign this machine: nobody assigned or provisioned it."""
    return machine is None or (not machine.image and machine.state not in INSTALLED)


def _oneline(text: str | None) -> str:
    """Free text (an agent's error message: anyone may post one) for an iPXE echo line."""
    return ipxetext.scrub(text or "unknown error")


class _Deadlines:
    """Connections that must finish what they are sending by a time: a client that
    sends its request's head (or a callback's body) a byte at a time would otherwise
    hold its thread for as long as it likes, each byte within the socket's timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}

    def set(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds

    def clear(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, due in self._due.items() if due <= now]
            for sock in late:
                del self._due[sock]
        for sock in late:
            log.debug("dropping a connection that missed its deadline")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns, and it ends


class _HeadReader:
    """A connection's reader that gives each request's line and headers HEAD_LIMIT bytes
    in all (http.server allows 100 headers of 64 KiB each)."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.left = HEAD_LIMIT

    def readline(self, size: int = -1) -> bytes:
        want = self.left + 1 if size < 0 else min(size, self.left + 1)
        line = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request head over {HEAD_LIMIT} bytes")
        return line

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


def _unknown_machine(mac: str, now: float) -> Machine:
    """A callback from a machine nobody assigned (booted by hand): track it anyway."""
    return Machine(mac, "", "", State.ASSIGNED, (Mark(State.ASSIGNED, now),), updated=now)


class Handler(BaseHTTPRequestHandler):
    server: BootenvServer
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT
    server_version = "bootenv"
    # TCP_NODELAY, as nginx has it: a keep-alive client asks for chunk after chunk, and
    # with Nagle's algorithm the end of each answer waited for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        self.head = _HeadReader(self.rfile)
        self.rfile = self.head  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self.head.left = HEAD_LIMIT
        self.unread = False
        self.answered = False  # a status line went out: no error answer can follow
        # Set before the request line: an idle keep-alive connection is dropped too.
        self.server.deadlines.set(self.connection, HEAD_TIMEOUT)
        try:
            super().handle_one_request()
        except http.client.LineTooLong:  # the request line alone was over the limit
            self.requestline, self.request_version, self.command = "", "", ""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
        finally:
            self.server.deadlines.clear(self.connection)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.deadlines.clear(self.connection)  # the head is in
        if ok:
            # A body this server does not read (a GET's, or one refused before reading)
            # must not be taken for the next request on the connection.
            self.unread = bool(self.headers.get("Transfer-Encoding")) or bool(
                _lengths(self.headers) - {"", "0"}
            )
        return ok

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answered = True
        super().send_response(code, message)

    def end_headers(self) -> None:
        if self.unread and not self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        super().end_headers()

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, *, head: bool) -> None:
        srv = self.server
        try:
            url = self._target()
            path, query = url.path, parse_qs(url.query)
            if path.startswith("/images/"):
                self._static(srv.config.images, path[len("/images/") :], head)
            elif path.startswith("/boot/") and srv.config.boot is not None:
                why = bootfiles.gone(srv.config.boot, path[len("/boot/") :])
                if why is not None:
                    raise _AnswerError(HTTPStatus.NOT_FOUND, why)
                self._static(srv.config.boot, path[len("/boot/") :], head)
            elif path == "/ipxe/boot.ipxe":
                self._text(menu.entry_script(srv.base_url), head)
            elif path == "/ipxe/machine" or path.startswith("/ipxe/machine/"):
                mac = self._mac(query.get("mac", [path.rpartition("/")[2]])[0])
                self._text(srv.machine_script(mac), head)
            elif path.startswith("/ipxe/select/"):
                mac = self._mac(query.get("mac", [""])[0])
                self._text(srv.select(unquote(path[len("/ipxe/select/") :]), mac), head)
            elif path == "/api/machines":
                self._json(HTTPStatus.OK, [_listed(m) for m in srv.store.scan()], head)
            elif path.startswith("/api/machines/"):
                mac = self._mac(unquote(path[len("/api/machines/") :]))
                machine = srv.store.get(mac)
                if machine is None:
                    raise _AnswerError(HTTPStatus.NOT_FOUND, f"no machine {mac}")
                # The last MiB of its log: the record counts them all ("events").
                body = {"machine": to_dict(machine), "events": srv.store.events(mac, budget=API_EVENTS)}
                self._json(HTTPStatus.OK, body, head)
            else:
                raise _AnswerError(HTTPStatus.NOT_FOUND, "not found")
        except _AnswerError as answer:
            self._json(answer.status, {"error": answer.message}, head)
        except (ConnectionError, TimeoutError):
            raise
        except (UserError, OSError) as exc:  # a damaged or unreadable record
            self._failed(exc, head)
        except Exception:  # a bug: the client gets a 500, the log the traceback
            self._crashed(head)

    def do_POST(self) -> None:
        try:
            path = self._target().path
            if not path.startswith("/callback/"):
                raise _AnswerError(HTTPStatus.NOT_FOUND, "not found")
            mac, assignment = self._callback_target(path[len("/callback/") :])
            doc = self._body()
            try:
                if not isinstance(doc, dict):
                    raise EventError("an event must be a JSON object")
                event = parse_event(doc)
            except EventError as exc:
                raise _AnswerError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
            try:
                # Each machine nobody assigned that posts is a record and a log: bounded.
                outcome = self.server.store.update(
                    mac, event, doc, create=_unknown_machine, assignment=assignment, limit=MAX_MACHINES
                )
            except StoreFullError as exc:
                raise _AnswerError(HTTPStatus.FORBIDDEN, exc.message) from exc
            except SupersededError as exc:
                log.warning("%s: refused a %s event: %s", mac, event.kind.value, exc.message)
                raise _AnswerError(HTTPStatus.CONFLICT, exc.message) from exc
            m = outcome.machine
            if outcome.changed:
                log.info(
                    "%s: %s", mac, m.state.value + (f" ({m.error})" if m.state in FINAL and m.error else "")
                )
            answer = {"state": m.state.value, "changed": outcome.changed, "invalid": outcome.invalid}
            if outcome.repeated:
                answer["repeated"] = True
            self._json(HTTPStatus.OK, answer)
        except _AnswerError as answer:
            self._json(answer.status, {"error": answer.message})
        except (ConnectionError, TimeoutError):
            raise
        except (UserError, OSError) as exc:
            self._failed(exc, False)
        except Exception:  # a bug: the client gets a 500, the log the traceback
            self._crashed(False)

    def _target(self) -> SplitResult:
        try:
            return urlsplit(self.path)
        except ValueError as exc:  # a broken IPv6 host: http://[x/
            raise _AnswerError(HTTPStatus.BAD_REQUEST, f"bad request target: {exc}") from exc

    def _failed(self, exc: UserError | OSError, head: bool) -> None:
        log.error("%s %s: %s", self.command, self.path, exc)  # with the hint: a file's path
        # The client is told what failed, not where: no path of the server's.
        message = exc.message if isinstance(exc, UserError) else exc.strerror or type(exc).__name__
        self._error(message, head)

    def _crashed(self, head: bool) -> None:
        log.exception("%s %s failed", self.command, self.path)
        self._error("internal error (the server's log has it)", head)

    def _error(self, message: str, head: bool) -> None:
        if self.answered:  # mid-answer: all the client can be told is the connection's end
            self.close_connection = True
            return
        self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}, head)

    def _mac(self, text: str) -> str:
        try:
            return normalize_mac(text)
        except UserError as exc:
            raise _AnswerError(HTTPStatus.BAD_REQUEST, exc.message) from exc

    def _callback_target(self, rest: str) -> tuple[str, str | None]:
        """`MAC` or `MAC/ASSIGNMENT` (the callback URL of the machine's iPXE script)."""
        mac, slash, assignment = rest.partition("/")
        if not slash:
            return self._mac(unquote(mac)), None
        try:
            return self._mac(unquote(mac)), check_assignment(unquote(assignment))
        except UserError as exc:
            raise _AnswerError(HTTPStatus.BAD_REQUEST, exc.message) from exc

    def _body(self) -> object:
        lengths = _lengths(self.headers)
        if len(lengths) > 1:  # which one frames the body? A proxy may have taken the other
            raise _AnswerError(HTTPStatus.BAD_REQUEST, "Content-Length headers that differ")
        length = lengths.pop() if lengths else ""
        if self.headers.get("Transfer-Encoding") or not _LENGTH.fullmatch(length):
            raise _AnswerError(HTTPStatus.LENGTH_REQUIRED, "a callback needs a Content-Length")
        if int(length) > self.server.config.max_body:
            raise _AnswerError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {self.server.config.max_body} bytes"
            )
        self.server.deadlines.set(self.connection, HEAD_TIMEOUT)
        try:
            data = self.rfile.read(int(length))
        finally:
            self.server.deadlines.clear(self.connection)
        if len(data) < int(length):
            raise ConnectionResetError("the client closed its connection mid-body")
        self.unread = False
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise _AnswerError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from exc

    def _text(self, text: str, head: bool = False) -> None:
        self._send(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8", head)

    def _json(self, status: HTTPStatus, body: object, head: bool = False) -> None:
        self._send(status, (json.dumps(body, indent=1) + "\n").encode(), "application/json", head)

    def _send(self, status: HTTPStatus, data: bytes, ctype: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _static(self, root: Path, rel: str, head: bool) -> None:
        try:
            path = resolve_under(root, rel)
        except (OSError, RuntimeError):  # a name too long, a symlink loop: nothing to serve
            raise _AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        if path is None:
            raise _AnswerError(HTTPStatus.FORBIDDEN, "path leaves the served directory")
        try:
            # O_NONBLOCK: a FIFO's open does not wait for a writer (that held the thread
            # for good); anything but a regular file is refused below.
            f = open(path, "rb", opener=_nonblocking)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        except OSError as exc:
            if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise
            raise _AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _AnswerError(HTTPStatus.NOT_FOUND, "not found")
            self._send_file(f, st.st_size, st.st_mtime, head)

    def _send_file(self, f: Any, size: int, mtime: float, head: bool) -> None:
        etag = f'"{int(mtime * 1e6):x}-{size:x}"'
        modified = email.utils.formatdate(mtime, usegmt=True)
        header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        # Only the ETag is trusted: a date has one-second precision, and a file replaced
        # within the second of the client's first part would splice two versions. A date
        # (or a changed ETag) gets the whole file, which RFC 9110 allows.
        if if_range and if_range.strip() != etag:
            header = None
        try:
            span = parse_range(header, size)
        except UnsatisfiableError:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span if span else (0, size - 1)
        length = end - start + 1 if size else 0
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header(
            "Content-Type", "application/json" if f.name.endswith(".json") else "application/octet-stream"
        )
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.end_headers()
        if head or not length:
            return
        try:
            sent = self.connection.sendfile(f, start, length)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.debug("%s: client went away: %s", self.address_string(), exc)
            self.close_connection = True
            return
        if sent < length:  # the file shrank while it was sent: the client must see a short body
            log.warning(
                "%s: %s shrank while it was sent (%d of %d bytes)",
                self.address_string(),
                f.name,
                sent,
                length,
            )
            self.close_connection = True


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)


def _lengths(headers: Any) -> set[str]:
    """The values of a request's Content-Length headers (one may list several)."""
    return {v.strip() for field in headers.get_all("Content-Length", []) for v in str(field).split(",")}


def _listed(entry: Machine | Damaged) -> dict[str, Any]:
    """/api/machines: a machine's record, or, for one that is damaged, why (no path)."""
    if isinstance(entry, Damaged):
        log.warning("%s", entry.error)  # with the hint: the file to restore
        return {"mac": entry.name, "damaged": entry.error.message}
    return to_dict(entry)


class _AnswerError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
