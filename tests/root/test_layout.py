"""Real LAMP capture: restore the OS sub-image, lay out components, compare with the gold."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bootenv.layout import LayoutConfig, layout
from bootenv.run import run
from tests.imagetools import archive_members, describe, load, restore_fs

OWN = ("var/lib/bootenv/", "etc/ld.so.cache", "var/cache/ldconfig/")


@contextmanager
def restored_os(image: Path, tmp: Path) -> Iterator[Path]:
    fs = tmp / "os.img"
    manifest = load(image)
    restore_fs(image, manifest.os, fs)
    # The OS sub-image is sized for the OS alone; grow it like the agent grows the partition.
    room = sum(c.data.raw_size for c in manifest.components) * 2 + (256 << 20)
    os.truncate(fs, manifest.rootfs.image_size + room)
    run(["e2fsck", "-fy", fs], check=False)
    run(["resize2fs", fs])
    mnt = tmp / "mnt"
    mnt.mkdir()
    run(["mount", "-o", "loop", fs, mnt])
    try:
        yield mnt
    finally:
        run(["umount", mnt])


def members(image: Path, name: str) -> dict[str, str]:
    comp = load(image).component(name)
    out = {}
    for m in archive_members(image / comp.data.file):
        rel = m.name.removeprefix("./")
        if rel and not rel.startswith(OWN):
            out[rel] = "dir" if m.isdir() else "other"
    return out


@pytest.mark.parametrize(("wanted", "absent"), [(("mysql",), "apache"), (("php",), "mysql")])
def test_layout_on_restored_os_matches_gold(
    gold_image: Path, gold_tree: Path, tmp_path: Path, wanted: tuple[str, ...], absent: str
) -> None:
    with restored_os(gold_image, tmp_path) as root:
        res = layout(LayoutConfig(str(gold_image), wanted, root))
        assert res.ok, res
        chosen = {c.name for c in res.components}
        assert chosen == ({"mysql"} if wanted == ("mysql",) else {"php", "apache"})
        for name in chosen:
            for rel, kind in members(gold_image, name).items():
                got, gold = root / rel, gold_tree / rel
                if kind == "dir":
                    assert stat.S_ISDIR(got.lstat().st_mode), rel
                    continue
                assert describe(got) == describe(gold), rel
                if not got.is_symlink():
                    assert got.lstat().st_mtime_ns == gold.lstat().st_mtime_ns, rel
                    assert sorted(os.listxattr(got)) == sorted(os.listxattr(gold)), rel
        ours = {p for n in chosen for p in members(gold_image, n)}
        for rel, kind in members(gold_image, absent).items():
            if kind != "dir" and rel not in ours:
                assert not os.path.lexists(root / rel), f"{absent} file {rel} is present"
        listing = run(["dpkg", f"--admindir={root}/var/lib/dpkg", "-l"]).stdout.decode()
        pkgs = {line.split()[1].split(":")[0] for line in listing.splitlines() if line.startswith("ii ")}
        manifest = load(gold_image)
        for name in chosen:
            assert set(manifest.component(name).packages) <= pkgs
        assert not set(manifest.component(absent).packages) & pkgs
        verify = run(["dpkg", f"--root={root}", "--verify"], check=False).stdout.decode()
        problems = [line for line in verify.splitlines() if " c /" not in line]
        assert problems == [], verify
        assert res.components[0].conflicts == ()
