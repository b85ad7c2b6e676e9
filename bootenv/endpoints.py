"""`bootenv serve`'s endpoints, as HTTP (the list: bootenv/serve.py): which path is
answered how, a callback's event read and checked, the state store listed as JSON.

What each answer holds is `BootenvServer`'s (bootenv/serve.py): the scripts, the choices
and events it records. The files under /images and /boot are `StaticHandler`'s
(bootenv/httpfiles.py), and each connection's bounds `BoundedHandler`'s
(bootenv/httpconn.py).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from bootenv import bootfiles, menu
from bootenv.catalog import CatalogError
from bootenv.errors import UserError
from bootenv.event_schema import EventError, parse_event
from bootenv.httpconn import AnswerError
from bootenv.httpfiles import StaticHandler
from bootenv.machine_record import to_dict
from bootenv.machines import FINAL, Machine, check_assignment, check_boot_args, normalize_mac
from bootenv.state import Damaged, StoreFullError, SupersededError

if TYPE_CHECKING:
    from bootenv.serve import BootenvServer

log = logging.getLogger(__name__)

API_EVENTS = 1 << 20  # bytes of a machine's events log /api/machines/MAC answers with


class Handler(StaticHandler):
    """GET and HEAD of files, scripts and the state store; POST of a callback's event."""

    server: BootenvServer

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
                    raise AnswerError(HTTPStatus.NOT_FOUND, why)
                self._static(srv.config.boot, path[len("/boot/") :], head)
            elif path == "/ipxe/boot.ipxe":
                self._text(menu.entry_script(srv.base_url), head)
            elif path == "/ipxe/machine" or path.startswith("/ipxe/machine/"):
                mac = self._mac(query.get("mac", [path.rpartition("/")[2]])[0])
                self._text(srv.machine_script(mac), head)
            elif path.startswith("/ipxe/select/"):
                mac = self._mac(query.get("mac", [""])[0])
                entry_id = unquote(path[len("/ipxe/select/") :])
                self._text(_too_long(srv, entry_id, mac) or srv.select(entry_id, mac), head)
            elif path == "/api/machines":
                self._json(HTTPStatus.OK, [_listed(m) for m in srv.store.scan()], head)
            elif path.startswith("/api/machines/"):
                mac = self._mac(unquote(path[len("/api/machines/") :]))
                machine = srv.store.get(mac)
                if machine is None:
                    raise AnswerError(HTTPStatus.NOT_FOUND, f"no machine {mac}")
                # The last MiB of its log: the record counts them all ("events").
                body = {"machine": to_dict(machine), "events": srv.store.events(mac, budget=API_EVENTS)}
                self._json(HTTPStatus.OK, body, head)
            else:
                raise AnswerError(HTTPStatus.NOT_FOUND, "not found")
        except AnswerError as answer:
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
                raise AnswerError(HTTPStatus.NOT_FOUND, "not found")
            mac, assignment = self._callback_target(path[len("/callback/") :])
            doc = self._body(self.server.config.max_body)
            try:
                if not isinstance(doc, dict):
                    raise EventError("an event must be a JSON object")
                event = parse_event(doc)
            except EventError as exc:
                raise AnswerError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
            try:
                outcome = self.server.take_event(mac, event, doc, assignment)
            except StoreFullError as exc:
                raise AnswerError(HTTPStatus.FORBIDDEN, exc.message) from exc
            except SupersededError as exc:
                log.warning("%s: refused a %s event: %s", mac, event.kind.value, exc.message)
                raise AnswerError(HTTPStatus.CONFLICT, exc.message, replaced=exc.replaced) from exc
            m = outcome.machine
            if outcome.changed:
                log.info(
                    "%s: %s", mac, m.state.value + (f" ({m.error})" if m.state in FINAL and m.error else "")
                )
            answer = {"state": m.state.value, "changed": outcome.changed, "invalid": outcome.invalid}
            if outcome.repeated:
                answer["repeated"] = True
            self._json(HTTPStatus.OK, answer)
        except AnswerError as answer:
            self._json(answer.status, {"error": answer.message, **answer.fields})
        except (ConnectionError, TimeoutError):
            raise
        except (UserError, OSError) as exc:
            self._failed(exc, False)
        except Exception:  # a bug: the client gets a 500, the log the traceback
            self._crashed(False)

    def _mac(self, text: str) -> str:
        try:
            return normalize_mac(text)
        except UserError as exc:
            raise AnswerError(HTTPStatus.BAD_REQUEST, exc.message) from exc

    def _callback_target(self, rest: str) -> tuple[str, str | None]:
        """`MAC` or `MAC/ASSIGNMENT` (the callback URL of the machine's iPXE script)."""
        mac, slash, assignment = rest.partition("/")
        if not slash:
            return self._mac(unquote(mac)), None
        try:
            return self._mac(unquote(mac)), check_assignment(unquote(assignment))
        except UserError as exc:
            raise AnswerError(HTTPStatus.BAD_REQUEST, exc.message) from exc


def _too_long(srv: BootenvServer, entry_id: str, mac: str) -> str | None:
    """The script refusing a menu choice whose ramdisk command line, with this server's
    URL, the kernel would cut (machines.check_boot_args), before select records it as
    the machine's assignment; None for any other choice (select answers it)."""
    try:
        entry = srv.catalog().entry(entry_id)
        check_boot_args(entry.image, entry.components, None, entry.kernel_args, base_url=srv.base_url)
    except CatalogError:
        return None
    except UserError as exc:
        return menu.message_script(mac, exc.message)
    return None


def _listed(entry: Machine | Damaged) -> dict[str, Any]:
    """/api/machines: a machine's record, or, for one that is damaged, why (no path)."""
    if isinstance(entry, Damaged):
        log.warning("%s", entry.error)  # with the hint: the file to restore
        return {"mac": entry.name, "damaged": entry.error.message}
    return to_dict(entry)
