"""Files read whole are read up to a cap, and only if they are regular files.

Before, `agent --cmdline /dev/zero` and `serve --catalog /dev/zero` read forever (a
MemoryError traceback in the end), a 300 MB manifest.json over HTTP was read whole
(644 MB of memory) before its 16 MiB cap refused it, and a manifest.json.sig that is a
directory was "[Errno 21] Is a directory", exit 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from bootenv.catalog import CatalogError, load_catalog
from bootenv.cli import main
from bootenv.errors import UserError
from bootenv.manifest import MAX_MANIFEST, ManifestError
from bootenv.signing import MAX_SIGNATURE
from bootenv.smallfile import read_capped
from bootenv.source import DirSource, load_manifest
from tests.conftest import serving
from tests.unit.test_manifest import make_manifest

BODY = 64 << 20  # a manifest.json four times the cap


class _Big(BaseHTTPRequestHandler):
    """GET /len/manifest.json: BODY bytes with a Content-Length; /close/...: the same
    with none, ended by closing. `sent` counts what reached the socket."""

    sent = 0
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.startswith("/len/"):
            self.send_header("Content-Length", str(BODY))
        self.end_headers()
        block = b" " * (1 << 20)
        try:
            for _ in range(BODY // len(block)):
                self.wfile.write(block)
                type(self).sent += len(block)
        except OSError:
            pass  # the client stopped reading


@pytest.fixture
def big() -> Iterator[str]:
    _Big.sent = 0
    with serving(_Big) as url:
        yield url


@pytest.mark.parametrize("kind", ["len", "close"])
def test_a_manifest_over_http_is_read_up_to_its_cap(big: str, kind: str) -> None:
    with pytest.raises(ManifestError, match=f"manifest.json is larger than {MAX_MANIFEST >> 20} MiB"):
        load_manifest(f"{big}/{kind}/")
    # what the server managed to send before the client hung up: the cap, plus what
    # the sockets' buffers held; not the whole body
    assert _Big.sent < BODY // 2


def test_a_local_manifest_is_read_up_to_its_cap(tmp_path: Path) -> None:
    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(BODY)
    with pytest.raises(ManifestError, match="larger than 16 MiB"):
        load_manifest(str(tmp_path))


def test_read_capped_reads_at_most_one_byte_past_the_limit_of_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_capped(tmp_path / "f", 10) == b"x" * 11
    assert read_capped(tmp_path / "f", 100) == b"x" * 100
    for path in (Path("/dev/zero"), tmp_path):
        with pytest.raises(UserError, match="is not a regular file"):
            read_capped(path, 10)


def test_agent_refuses_a_cmdline_that_is_no_regular_file_or_too_large(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["agent", "--cmdline", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert err == "bootenv: error: the kernel command line /dev/null is not a regular file\n"
    (tmp_path / "cmdline").write_bytes(b"quiet " * 20000 + b"bootenv.image=http://x/y\n")
    assert main(["agent", "--cmdline", str(tmp_path / "cmdline")]) == 2
    assert "is larger than 64 KiB" in capsys.readouterr().err


def test_serve_refuses_a_catalog_that_is_no_regular_file_or_too_large(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read the catalog /dev/null: not a regular file"):
        load_catalog(tmp_path, Path("/dev/null"))
    (tmp_path / "catalog.json").write_text('{"entries": []}' + " " * (1 << 20))
    with pytest.raises(CatalogError, match="is larger than 1 MiB"):
        load_catalog(tmp_path)


def _image(tmp_path: Path) -> Path:
    (tmp_path / "manifest.json").write_text(make_manifest().to_json())
    return tmp_path


def test_a_signature_that_is_a_directory_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (_image(tmp_path) / "manifest.json.sig").mkdir()
    assert main(["verify", str(tmp_path), "--insecure"]) == 2  # not taken as "not signed"
    err = capsys.readouterr().err
    assert err == f"bootenv: error: {tmp_path}/manifest.json.sig is not a regular file\n"


def test_a_signature_too_large_is_malformed_and_a_missing_one_is_unsigned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _image(tmp_path)
    assert main(["verify", str(tmp_path), "--manifest-only"]) == 4
    assert "the image is not signed" in capsys.readouterr().err
    (tmp_path / "manifest.json.sig").write_bytes(b" " * (MAX_SIGNATURE + 1))
    assert main(["verify", str(tmp_path), "--manifest-only", "--insecure"]) == 4
    assert "manifest.json.sig is malformed" in capsys.readouterr().err


def test_a_blob_that_is_a_directory_is_one_line_naming_it(tmp_path: Path) -> None:
    (_image(tmp_path) / "blob").mkdir()
    with pytest.raises(UserError, match=r"cannot read .*/blob: Is a directory"):
        DirSource(tmp_path).open("blob", 1)
