"""Load on a real nginx (Debian's nginx-light): 32 clients stream the image byte-identically."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from bootenv.nginxconf import NginxSite
from bootenv.run import which
from bootenv.serve import ServeConfig, running
from tests.conftest import require_root
from tests.load.loadkit import Built, build_image, stream_clients
from tests.root.test_nginx import start_nginx

pytestmark = pytest.mark.root


@pytest.fixture
def nginx_image(tmp_path: Path) -> Iterator[tuple[str, Built]]:
    require_root()
    try:
        nginx = which("nginx")
    except Exception:
        pytest.skip("nginx is not installed: `make deps` installs Debian's nginx-light")
    images, prefix = tmp_path / "images", tmp_path / "nginx"
    built = build_image(images)
    for sub in ("tmp", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True)

    def site_on(port: int, attempt: ExitStack) -> NginxSite:
        server = attempt.enter_context(running(ServeConfig(images=images, state=tmp_path / "state", port=0)))
        return NginxSite(
            images=images,
            listen=f"127.0.0.1:{port}",
            bootenv=f"127.0.0.1:{server.port}",
            prefix=prefix,
            user="root",
            workers=2,
        )

    with ExitStack() as stack:
        port = start_nginx(stack, nginx, prefix, site_on)
        yield f"http://127.0.0.1:{port}/images/lamp", built


def test_32_clients_stream_from_nginx_byte_identically(
    nginx_image: tuple[str, Built], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.load.loadkit")
    url, built = nginx_image
    work = tmp_path / "clients"
    work.mkdir()
    result = stream_clients(url, built, work, clients=32)
    assert result.errors == () and result.mismatches == ()
    per_client = built.manifest.os.data.size + sum(c.data.size for c in built.manifest.components)
    assert len(result.clients) == 32 and result.bytes == 32 * per_client
    assert any("MiB/s aggregate" in r.getMessage() for r in caplog.records)
