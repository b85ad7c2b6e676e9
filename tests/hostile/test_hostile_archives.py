"""Hand-made hostile component archives: each is refused or contained in the root."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from bootenv.layout import LayoutConfig, LayoutResult, layout
from bootenv.paxread import ArchiveError, PaxReader
from tests.hostile import kit
from tests.hostile.kit import Comp, d, f, hard, make_image, outside_listing, raw_name, special, sym, tar_bytes


def _quiet(root: Path, units: list[str]) -> list[str]:
    return []


def lay(tmp_path: Path, members: list[tarfile.TarInfo]) -> tuple[Path, LayoutResult]:
    image = make_image(tmp_path / "img", [Comp("evil", members)])
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "victim").write_text("precious\n")
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=_quiet)
    return root, res


def contained(tmp_path: Path, root: Path) -> None:
    outside = outside_listing(tmp_path, root)
    img = {p for p in outside if p == "img" or p.startswith("img/")}
    assert outside - img == {"victim"}, "something was written outside the root"
    assert (tmp_path / "victim").read_text() == "precious\n"


CASES = {
    "dotdot": [raw_name(f("x", "pwned"), "../victim")],
    "dotdot-deep": [d("a"), raw_name(f("x", "pwned"), "./a/../../victim")],
    "absolute": [raw_name(f("x", "pwned"), "/tmp/bootenv-hostile-absolute")],
    "symlink-escape-then-write": [sym("esc", "../"), f("esc/victim", "pwned")],
    "symlink-abs-then-write": [sym("esc", "/"), f("esc/tmp/bootenv-hostile", "pwned")],
    "symlink-file-then-overwrite": [sym("v", "../victim"), f("v", "pwned")],
    "hardlink-outside": [hard("h", "../victim")],
    "hardlink-absolute": [raw_name(hard("h", "x"), "./h"), raw_name(hard("h2", "/etc/passwd"), "./h2")],
    "hardlink-not-in-archive": [hard("h", "./etc/passwd")],
    "bootenv-state": [
        d("var"),
        d("var/lib"),
        d("var/lib/bootenv"),
        f("var/lib/bootenv/conflict-records/x.json", "{}"),
    ],
    "alternatives-record": [
        d("var"),
        d("var/lib"),
        d("var/lib/bootenv"),
        d("var/lib/bootenv/alternatives"),
        f("var/lib/bootenv/alternatives/web", "{}"),
    ],
    "temp-prefix": [sym(".bootenv~evil~2", "../victim"), f("a", "x")],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_entry_is_refused_or_contained(tmp_path: Path, case: str) -> None:
    root, res = lay(tmp_path, CASES[case])
    contained(tmp_path, root)
    if case != "symlink-file-then-overwrite":
        assert not res.ok and "refused" in (res.components[0].error or "")
    assert not os.path.exists("/tmp/bootenv-hostile-absolute") and not os.path.exists("/tmp/bootenv-hostile")


def test_symlink_then_same_name_file_is_a_conflict_not_a_write_through(tmp_path: Path) -> None:
    root, res = lay(tmp_path, CASES["symlink-file-then-overwrite"])
    assert res.components[0].warnings == ("duplicate entry /v skipped",)
    assert os.readlink(root / "v") == "../victim"
    assert (tmp_path / "victim").read_text() == "precious\n"


def test_existing_symlinked_parent_in_the_target_is_not_followed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [Comp("evil", [f("etc/x", "pwned")])])
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "etc").symlink_to(tmp_path / "elsewhere")
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=_quiet)
    assert not res.ok and list((tmp_path / "elsewhere").iterdir()) == []


def test_duplicate_entries_keep_the_first(tmp_path: Path) -> None:
    root, res = lay(tmp_path, [f("dup", "first"), f("dup", "second")])
    assert (root / "dup").read_text() == "first"
    assert any("duplicate" in w for w in res.components[0].warnings)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may create device nodes")
def test_device_node_as_non_root_is_skipped(tmp_path: Path) -> None:
    root, res = lay(tmp_path, [special("dev-sda", tarfile.BLKTYPE, 8, 0)])
    assert res.ok and not (root / "dev-sda").exists()
    assert any("device node" in w for w in res.components[0].warnings)


def test_device_node_is_skipped_when_not_privileged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root, res = lay(tmp_path, [special("dev-sda", tarfile.BLKTYPE, 8, 0), f("ok", "fine")])
    assert res.ok and not (root / "dev-sda").exists() and (root / "ok").read_text() == "fine"


def test_huge_declared_size_fails_without_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member whose header claims 4 GiB, in an archive of 10 KiB, is refused before a
    byte of it is read or written."""
    raw = bytearray(tar_bytes([f("big", "tiny"), f("after", "x")]))
    length = len(raw)
    hdr = raw.find(b"./big\0")
    assert hdr >= 0 and hdr % 512 == 0  # the name field of big's own ustar header
    size = b"%011o\0" % (1 << 32)  # 11 octal digits and a NUL: the whole 12-byte field
    assert len(size) == 12
    raw[hdr + 124 : hdr + 136] = size
    chk = sum(raw[hdr : hdr + 148]) + 8 * 32 + sum(raw[hdr + 156 : hdr + 512])
    raw[hdr + 148 : hdr + 156] = b"%06o\0 " % chk
    assert len(raw) == length  # edited in place: nothing after the header has moved
    refused = "member claims 4294967296 bytes, more than the archive holds"

    members = []
    with pytest.raises(ArchiveError, match=f"^{re.escape(refused)}$"):
        for member in PaxReader(io.BytesIO(bytes(raw)), limit=length):
            members.append(member)
    assert members == []

    # Laid out: the component fails with that error, and neither big nor anything
    # after it is in the root.
    monkeypatch.setattr(kit, "tar_bytes", lambda members: bytes(raw))
    root, res = lay(tmp_path, [f("big", "tiny"), f("after", "x")])
    assert not res.ok and refused in (res.components[0].error or ""), res.components[0].error
    assert not (root / "big").exists() and not (root / "after").exists()
    assert not [p for p in root.rglob("*") if p.name.startswith(".bootenv~")]
    contained(tmp_path, root)
