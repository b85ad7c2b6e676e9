"""`layout` checks the image's signature before its first write, also over HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bootenv.errors import BootenvError, VerificationError
from bootenv.event_schema import Kind, parse_event
from bootenv.layout import LayoutConfig, layout
from bootenv.signing import SIGNATURE, Trust, keygen, read_public_key, sign
from tests.faults.conftest import Image
from tests.faults.helpers import Recorder, tree
from tests.unit.httpfault import FaultServer


def signed_copy(image: Image, tmp: Path) -> tuple[Path, Trust]:
    out = tmp / "signed"
    shutil.copytree(image.dir, out)
    key = tmp / "key"
    keygen(key)
    (out / SIGNATURE).write_bytes(sign((out / "manifest.json").read_bytes(), key))
    return out, Trust(keys=(read_public_key(key.with_name("key.pub")),))


def lay(location: str, root: Path, trust: Trust, callback: str | None = None) -> tuple[object, Recorder]:
    root.mkdir()
    act = Recorder()
    cfg = LayoutConfig(location, "all", root, streams=1, trust=trust, callback=callback)
    return layout(cfg, activator=act), act


def test_signed_image_lays_out_over_http(image: Image, tmp_path: Path) -> None:
    signed, trust = signed_copy(image, tmp_path)
    with FaultServer(signed) as srv:
        res, _ = lay(srv.url, tmp_path / "root", trust)
    assert res.ok  # type: ignore[attr-defined]
    assert tree(tmp_path / "root") == image.clean


@pytest.mark.parametrize("attack", ["unsigned", "tampered", "untrusted"])
def test_refused_before_the_first_write(
    image: Image, tmp_path: Path, attack: str, events: tuple[str, list[dict[str, object]]]
) -> None:
    """Refused, and the refusal posted: the server shows why the machine stopped."""
    signed, trust = signed_copy(image, tmp_path)
    if attack == "unsigned":
        (signed / SIGNATURE).unlink()
    elif attack == "tampered":  # point a component at other bytes, keep the old signature
        doc = json.loads((signed / "manifest.json").read_text())
        doc["components"][0]["units"] = ["evil.service"]
        (signed / "manifest.json").write_text(json.dumps(doc))
    else:
        other = tmp_path / "other"
        keygen(other)
        trust = Trust(keys=(read_public_key(other.with_name("other.pub")),))
    root = tmp_path / "root"
    url, posted = events
    with FaultServer(signed) as srv, pytest.raises(BootenvError) as err:
        lay(srv.url, root, trust, callback=url)
    assert isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value)
    (last,) = posted
    error = parse_event(last)
    assert (error.kind, error.source, error.fatal, error.message) == (
        Kind.ERROR,
        "layout",
        True,
        str(err.value),
    )
    assert list(root.iterdir()) == [], "nothing was written"
    blobs = [r for r in srv.requests if r.path.endswith(".tar.zst")]
    assert blobs == [], "no blob was even fetched"
