"""The benchmarks' synthetic gold tree, tiny, captured for real: each package's files land
in the sub-image the split rules promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.synthetic import SyntheticSpec, build, plan
from bootenv.capture import CaptureConfig, capture
from bootenv.split import parse_component_arg
from tests.conftest import require_root, require_tools
from tests.imagetools import archive_members, load, mounted, restore_fs


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tools("mke2fs", "e2fsck")


def test_tiny_synthetic_tree_splits_by_package(tmp_path: Path) -> None:
    spec = SyntheticSpec(scale=0.002)
    p = plan(spec)
    build(p, tmp_path / "gold", spec.seed)
    specs = tuple(parse_component_arg(c) for c in p.components)
    out = tmp_path / "image"
    capture(CaptureConfig(root=tmp_path / "gold", output=out, components=specs))
    m = load(out)
    assert [c.name for c in m.components] == ["app", "db", "web"]
    kinds = {n.path: n.kind for n in p.nodes}
    images: dict[str, set[str]] = {}
    for pkg in p.packages:
        for o in pkg.owns:
            images.setdefault(o, set()).add(pkg.image)
    for comp in m.components:
        assert set(comp.packages) == {pkg.name for pkg in p.packages if pkg.image == comp.name}
        members = {"/" + t.name.removeprefix("./"): t for t in archive_members(out / comp.data.file)}
        owned = {o for o, i in images.items() if i == {comp.name} and kinds[o] != "dir"}
        assert owned and owned <= set(members), comp.name
    db = {"/" + t.name.removeprefix("./"): t for t in archive_members(out / m.component("db").data.file)}
    assert (db["/var/lib/synthdb/ibdata0"].uid, db["/var/lib/synthdb"].mode) == (999, 0o700)
    assert "/etc/systemd/system/multi-user.target.wants/synthdb.service" in db
    assert m.component("db").units == ("synthdb.service",)
    restore_fs(out, m.os, tmp_path / "os.img")
    with mounted(tmp_path / "os.img", tmp_path / "mnt") as mnt:
        assert (mnt / "etc/synth/common.conf").is_file()  # owned by web and app: the OS's
        assert (mnt / "usr/lib/synthshared").is_dir()  # needed by web and app: the OS's
        assert (mnt / "usr/bin/synth-tool").stat().st_ino == (mnt / "usr/bin/synth-tool-alias").stat().st_ino
        assert not (mnt / "usr/sbin/synthdbd").exists() and not (mnt / "var/lib/synthdb").exists()
        assert not (mnt / "etc/synth/web.conf").exists()
