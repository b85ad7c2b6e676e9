"""Wrong bytes during `layout`: always detected, the component fails, nothing of it placed.

Each seed picks a fault and where it strikes: a flipped byte, a stream truncated (with
honest headers, or with a Content-Length claiming the full size), a broken zstd frame
header, or a Content-Length that lies about the size. The healthy component laid out
alongside must still be activated; the broken one must not be, and its dpkg paragraphs
must stay out of /var/lib/dpkg/status.

One case places some files all the same: an image whose manifest was re-signed over
data that is not a valid archive (its hash matches what is signed). Its component still
fails and is not activated, but files read before the fault may be in the tree
(docs/SECURITY.md, "Not guaranteed").
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from bootenv.journal import Journal
from tests.conftest import seeds
from tests.faults.conftest import Image
from tests.faults.helpers import blob_of, run_layout
from tests.unit.httpfault import Fault, FaultServer

KINDS = ("corrupt", "truncate", "truncate-lie", "zstd-frame", "length")
SEEDS = seeds(10, 25)  # two of each kind of fault in `make check`


def fault_for(seed: int, size: int) -> tuple[str, Fault]:
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    if kind == "corrupt":
        at = (0, size - 1)[seed // 5 % 2] if seed < 10 else rng.randrange(size)  # the edges, then anywhere
        return kind, Fault(corrupt_at=at)
    if kind == "truncate":
        return kind, Fault(truncate=rng.randrange(1, size))
    if kind == "truncate-lie":
        n = rng.randrange(1, size)
        return kind, Fault(truncate=n, length_delta=size - n)  # says "all of it", sends n bytes
    if kind == "zstd-frame":
        return kind, Fault(corrupt_at=rng.randrange(0, 5))  # magic number or frame descriptor
    return kind, Fault(length_delta=rng.choice((-1, 1)) * rng.randint(1, 4096))


def assert_nothing_of_bad_placed(root: Path) -> None:
    """Every piece is verified before a stream is given it: no byte of the broken blob
    reaches a file, not even the ones ahead of the fault."""
    assert not (root / "opt/bad").exists()
    assert b"# bad" not in (root / "etc/conf.d/shared.conf").read_bytes()


def assert_bad_not_activated(root: Path, image: Image, res_act: tuple[object, object]) -> None:
    res, act = res_act
    by_name = {c.name: c for c in res.components}  # type: ignore[attr-defined]
    assert not res.ok  # type: ignore[attr-defined]
    assert by_name["good"].status == "done"
    assert by_name["bad"].status == "failed"
    error = by_name["bad"].error
    assert error and "\n" not in error, "the failure is reported in one line"
    failure = res.failure()  # type: ignore[attr-defined]
    assert failure is not None and str(failure).startswith("layout failed: ") and "\n" not in str(failure)
    assert failure.exit_code in (1, 4)  # data that did not verify, or an archive that is malformed
    assert act.calls == [(root, ["good.service"])], "only the healthy component is activated"  # type: ignore[attr-defined]
    status = (root / "var/lib/dpkg/status").read_text()
    assert "Package: pkg-good" in status and "pkg-bad" not in status
    doc = json.loads((image.dir / "manifest.json").read_text())
    sha = next(c["data"]["sha256"] for c in doc["components"] if c["name"] == "bad")
    assert not Journal(root).reached("bad", sha, "files"), "a re-run must lay it out again"


@pytest.mark.parametrize("seed", SEEDS)
def test_wrong_bytes_on_the_wire_are_detected(
    image: Image, srv: FaultServer, tmp_path: Path, seed: int
) -> None:
    file, size = blob_of(image.dir, "bad")
    kind, fault = fault_for(seed, size)
    srv.faults[file] = fault
    root = tmp_path / "root"
    got = run_layout(srv.url, root, streams=1 + seed % 2)
    assert_bad_not_activated(root, image, got)
    assert_nothing_of_bad_placed(root)
    assert srv.requests_for(file), f"{kind}: the blob was fetched"
    failure = got[0].failure()
    assert failure is not None and failure.exit_code == 4, f"{kind}: {failure}"


def _resigned(image: Image, tmp: Path, mutate: bytes) -> Path:
    """A copy of the image whose `bad` blob is `mutate`, with a manifest that pins it.

    The hash matches, so only the decompressor and the archive reader can notice.
    """
    out = tmp / "img"
    shutil.copytree(image.dir, out)
    doc = json.loads((out / "manifest.json").read_text())
    comp = next(c for c in doc["components"] if c["name"] == "bad")
    (out / comp["data"]["file"]).unlink()
    sha = hashlib.sha256(mutate).hexdigest()
    (out / f"{sha}.tar.zst").write_bytes(mutate)
    comp["data"].update(file=f"{sha}.tar.zst", sha256=sha, size=len(mutate))
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("seed", range(10))
def test_malformed_frame_with_a_matching_hash_is_detected(image: Image, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    file, size = blob_of(image.dir, "bad")
    data = bytearray((image.dir / file).read_bytes())
    if seed % 2:
        data[rng.randrange(0, 4)] ^= 1 << rng.randrange(8)  # not a zstd frame at all
    else:
        data = data[: rng.randrange(1, size // 2)]  # the frame ends before the archive does
    img = _resigned(image, tmp_path, bytes(data))
    root = tmp_path / "root"
    got = run_layout(str(img), root)
    assert_bad_not_activated(root, Image(img, image.clean), got)


def test_wrong_bytes_exit_with_the_verification_code_and_one_line(
    image: Image, srv: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootenv.cli import main

    file, size = blob_of(image.dir, "bad")
    srv.faults[file] = Fault(corrupt_at=size // 2)
    root = tmp_path / "root"
    root.mkdir()
    argv = ["layout", "--image", srv.url, "--components", "bad", "--root", str(root), "--insecure"]
    assert main(argv) == 4
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bootenv: error:")]
    assert err == ["bootenv: error: layout failed: bad: sub-image does not match its sha256; not activated"]


def test_only_the_broken_component_laid_out_alone_activates_nothing(
    image: Image, srv: FaultServer, tmp_path: Path
) -> None:
    file, size = blob_of(image.dir, "bad")
    srv.faults[file] = Fault(corrupt_at=size // 2)
    res, act = run_layout(srv.url, tmp_path / "root", ("bad",))
    assert not res.ok and res.components[0].status == "failed"
    assert act.calls == []
    assert not (tmp_path / "root/var/lib/dpkg/status").exists()
    assert not (tmp_path / "root/opt").exists()
    # /etc holds only the drop-ins that keep the broken component's units from starting.
    etc = sorted(
        str(p.relative_to(tmp_path / "root/etc")) for p in (tmp_path / "root/etc").rglob("*") if p.is_file()
    )
    assert etc and all(re.fullmatch(r"systemd/system/[^/]+\.d/bootenv-hold-bad\.conf", e) for e in etc), etc
