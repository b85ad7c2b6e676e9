"""A real nginx (Debian's nginx-light) serves the images; bootenv serve keeps scripts and state.

nginx and `bootenv serve` both bind 127.0.0.1 on free ports and are stopped by the test.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootenv import ramdisk, ramdisk_export
from bootenv.machines import State, assign
from bootenv.nginxconf import NginxSite, render
from bootenv.qemu import free_port
from bootenv.run import Stream, popen, which
from bootenv.serve import BootenvServer, ServeConfig, running
from bootenv.state import Store
from tests.conftest import require_root
from tests.serveimage import make_image

MAC = "52:54:00:12:34:56"
MiB = 1 << 20


@dataclass(frozen=True)
class Rack:
    nginx_port: int
    bootenv: BootenvServer
    images: Path


BIND_TRIES = 5


def start_nginx(
    stack: ExitStack, nginx: str, prefix: Path, site_on: Callable[[int, ExitStack], NginxSite]
) -> int:
    """Start nginx on a free port and return the port.

    A free port is only free when it is picked: another process may bind it before nginx
    does. nginx then retries its bind and exits, so this picks another port and starts
    again (with what `site_on` set up for the last port torn down). Started means the pid
    file is written, which nginx does once its sockets are bound, and not merely that
    something answers on the port.
    """
    log = prefix / "error.log"
    for _ in range(BIND_TRIES):
        port = free_port()
        attempt = ExitStack()
        with attempt:
            conf = prefix / "nginx.conf"
            conf.write_text(render(site_on(port, attempt)))
            (prefix / "nginx.pid").unlink(missing_ok=True)
            proc = popen([nginx, "-p", prefix, "-c", conf, "-e", log], stdout=None)
            attempt.callback(stop_nginx, proc)
            if started(proc, prefix / "nginx.pid", log):
                stack.push(attempt.pop_all())
                return port
    pytest.fail(f"nginx found no free port in {BIND_TRIES} tries: {log.read_text()}")


def started(proc: Stream, pid: Path, log: Path, deadline: float = 15.0) -> bool:
    """True once nginx has bound its port, False if it exited because the port was taken.

    nginx is installed (the caller checked): any other failure is the rendered config or
    the setup failing, not the machine lacking nginx.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.popen.poll() is not None:
            text = log.read_text() if log.exists() else ""
            if "Address already in use" in text:
                return False
            pytest.fail(f"nginx exited with {proc.popen.returncode}: {text or 'no error log'}")
        if pid.exists() and pid.read_text().strip() == str(proc.popen.pid):
            return True
        time.sleep(0.05)
    pytest.fail(
        f"nginx did not start in {deadline:.0f} s: {log.read_text() if log.exists() else 'no error log'}"
    )


@pytest.fixture
def rack(tmp_path: Path) -> Iterator[Rack]:
    require_root()
    try:
        nginx = which("nginx")
    except Exception:
        pytest.skip("nginx is not installed: `make deps` installs Debian's nginx-light")
    images, boot, prefix = tmp_path / "images", tmp_path / "boot", tmp_path / "nginx"
    make_image(images, components={"apache": 3 * MiB + 17, "mysql": 5 * MiB + 3, "php": 2 * MiB})
    (tmp_path / "built").mkdir()
    (tmp_path / "built/vmlinuz").write_bytes(b"K" * 4096)
    (tmp_path / "built/initramfs.img").write_bytes(b"I" * 8192)
    built = ramdisk.Ramdisk(
        tmp_path / "built/vmlinuz", tmp_path / "built/initramfs.img", "6.1", "k" * 16, True
    )
    ramdisk_export.export(
        built, boot
    )  # build-ramdisk -o's layout: the pair, and the pair under the build's id
    for sub in ("tmp", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True)
    servers: list[BootenvServer] = []

    def site_on(port: int, attempt: ExitStack) -> NginxSite:
        # bootenv serve behind nginx: scripts must point iPXE at nginx's address.
        server = attempt.enter_context(
            running(
                ServeConfig(
                    images=images,
                    state=tmp_path / "state",
                    port=0,
                    boot=boot,
                    public_url=f"http://127.0.0.1:{port}",
                )
            )
        )
        servers.append(server)
        return NginxSite(
            images=images,
            listen=f"127.0.0.1:{port}",
            bootenv=f"127.0.0.1:{server.port}",
            boot=boot,
            prefix=prefix,
            user="root",  # pytest's tmp dirs are private to root
            workers=2,
        )

    with ExitStack() as stack:
        port = start_nginx(stack, nginx, prefix, site_on)
        server = servers[-1]
        yield Rack(port, server, images)


def stop_nginx(proc: Stream) -> None:
    """SIGTERM: the master stops its workers (a SIGKILL would orphan them)."""
    if proc.popen.poll() is None:
        proc.popen.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)
    proc.kill()


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_parallel_range_requests_fetch_every_component_byte_exact(rack: Rack) -> None:
    status, _, body = fetch(rack.nginx_port, "/images/lamp/manifest.json")
    assert status == 200
    manifest = json.loads(body)
    comps = manifest["components"]
    piece = 512 * 1024
    jobs = []
    for c in comps:
        size = c["data"]["size"]
        for start in range(0, size, piece):
            jobs.append((c["name"], f"/images/lamp/{c['data']['file']}", start, min(start + piece, size) - 1))

    def get_range(job: tuple[str, str, int, int]) -> tuple[str, int, bytes]:
        name, path, start, end = job
        status, headers, data = fetch(rack.nginx_port, path, {"Range": f"bytes={start}-{end}"})
        assert status == 206, (status, headers)
        assert headers["Content-Range"].startswith(f"bytes {start}-{end}/")
        assert "Content-Encoding" not in headers
        return name, start, data

    with ThreadPoolExecutor(max_workers=8) as pool:
        pieces = list(pool.map(get_range, jobs))
    assert len(pieces) > 3 * len(comps)  # really in parallel pieces, not one request each
    for c in comps:
        parts = sorted((start, data) for name, start, data in pieces if name == c["name"])
        whole = b"".join(data for _, data in parts)
        assert len(whole) == c["data"]["size"]
        assert hashlib.sha256(whole).hexdigest() == c["data"]["sha256"]


def test_nginx_answers_like_bootenv_serve(rack: Rack) -> None:
    comp = json.loads((rack.images / "lamp" / "manifest.json").read_text())["components"][0]
    path = f"/images/lamp/{comp['data']['file']}"
    status, headers, _ = fetch(rack.nginx_port, path, {"Range": "bytes=999999999-"})
    assert status == 416
    status, headers, _ = fetch(rack.nginx_port, path)
    assert status == 200 and "immutable" in headers["Cache-Control"]
    assert "immutable" not in fetch(rack.nginx_port, "/images/lamp/manifest.json")[1]["Cache-Control"]
    assert fetch(rack.nginx_port, "/images/../nginx/nginx.conf")[0] in (400, 403, 404)
    (rack.images / "lamp" / "escape").symlink_to(rack.images.parent / "nginx" / "nginx.conf")
    assert fetch(rack.nginx_port, "/images/lamp/escape")[0] in (403, 404)
    assert fetch(rack.nginx_port, "/boot/initramfs.img", {"Range": "bytes=-2"})[2] == b"II"


def test_the_agent_reader_streams_a_component_through_nginx(rack: Rack) -> None:
    from bootenv.source import HttpSource

    comp = json.loads((rack.images / "lamp" / "manifest.json").read_text())["components"][1]
    src = HttpSource(f"http://127.0.0.1:{rack.nginx_port}/images/lamp")
    with src.open(comp["data"]["file"], comp["data"]["size"]) as reader:  # type: ignore[attr-defined]
        data = reader.read()
    assert hashlib.sha256(data).hexdigest() == comp["data"]["sha256"]


def test_scripts_and_callbacks_pass_through_nginx_to_bootenv(rack: Rack) -> None:
    Store(rack.bootenv.config.state).put(assign(MAC, "lamp", "mysql", now=time.time()))
    status, _, body = fetch(rack.nginx_port, f"/ipxe/machine?mac={MAC}")
    assert status == 200
    assert f"bootenv.image=http://127.0.0.1:{rack.nginx_port}/images/lamp" in body.decode()
    conn = http.client.HTTPConnection("127.0.0.1", rack.nginx_port, timeout=10)
    callback = re.search(r"bootenv\.callback=http://[^/]+(/callback/\S+)", body.decode())
    assert callback is not None  # the assignment's own URL: /callback/MAC/ID
    conn.request("POST", callback[1], body=b'{"event": "os_written"}')
    assert conn.getresponse().status == 200
    conn.close()
    machine = Store(rack.bootenv.config.state).get(MAC)
    assert machine is not None and machine.state is State.OS_WRITTEN
    assert "sanboot" in fetch(rack.nginx_port, f"/ipxe/machine?mac={MAC}")[2].decode()


def test_nginx_serves_the_ramdisk_build_a_script_names(rack: Rack) -> None:
    """The build's directory under --boot holds plain files (hard links, which nginx's
    disable_symlinks lets through), so nginx serves the URLs bootenv's scripts name."""
    Store(rack.bootenv.config.state).put(assign(MAC, "lamp", "all", now=time.time()))
    text = fetch(rack.nginx_port, f"/ipxe/machine?mac={MAC}")[2].decode()
    paths = re.findall(
        rf"^(?:kernel|initrd --name initramfs.img) http://127.0.0.1:{rack.nginx_port}(\S+)", text, re.M
    )
    assert rack.bootenv.config.boot is not None
    build = json.loads((rack.bootenv.config.boot / "ramdisk.json").read_text())["build"]
    assert paths == [f"/boot/{build}/vmlinuz", f"/boot/{build}/initramfs.img"]
    assert [fetch(rack.nginx_port, path)[:3:2] for path in paths] == [(200, b"K" * 4096), (200, b"I" * 8192)]
