"""An alternatives group whose selected candidate is a component's, and whose others are
the OS's: the real OS sub-image works alone, and laying out the component brings back
the gold's selection (the synthetic gold, captured, restored and laid out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootenv.capture import CaptureConfig, capture
from bootenv.intree import disk_links, resolve
from bootenv.layout import LayoutConfig, layout
from tests.conftest import require_root
from tests.imagetools import archive_members, load, mounted, restore_fs
from tests.root.test_layout import restored_os
from tests.unit.test_alternatives import AWK, EDITOR, GOLD_LINKS, SPECS, shared_gold


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


DB_STATUS = "/var/lib/bootenv/dpkg/db.status"  # what a component had of bootenv's before


def _links(root: Path) -> dict[str, str | None]:
    return {
        p: os.readlink(root / p.lstrip("/")) if os.path.islink(root / p.lstrip("/")) else None
        for p in GOLD_LINKS
    }


def test_the_os_image_selects_its_own_candidate_and_the_component_the_golds(tmp_path: Path) -> None:
    gold = shared_gold(tmp_path / "gold")
    out = tmp_path / "image"
    capture(CaptureConfig(root=gold, output=out, components=SPECS, single=True))
    with restored_os(out, tmp_path) as root:
        db = root / "var/lib/dpkg/alternatives"
        # (a) The OS alone: awk is mawk, the editor nano, and their entries list only those.
        assert resolve("/usr/bin/awk", disk_links(root)) == "/usr/bin/mawk"
        assert (root / "usr/bin/mawk").is_file() and not (root / "usr/bin/gawk").exists()
        assert resolve("/usr/share/man/man1/nawk.1.gz", disk_links(root)) == "/usr/share/man/man1/mawk.1.gz"
        assert os.readlink(root / "etc/alternatives/editor") == "/usr/bin/nano"
        assert not os.path.lexists(root / "etc/alternatives/editor.fr.1.gz")
        assert "/usr/bin/gawk" not in (db / "awk").read_text() and (db / "awk").read_text().startswith(
            "auto\n"
        )
        assert "/usr/bin/vim.basic" not in (db / "editor").read_text()
        assert (db / "php").exists() is False  # php's group is php's alone, as before
        # The component carries gawk, and neither the groups' links nor any record of
        # them: the OS image has db's (a bootenv before them refuses any such file in a
        # component, and ignores the OS image's).
        m = load(out)
        members = {
            "/" + t.name.removeprefix("./") for t in archive_members(out / m.component("db").data.file)
        }
        own = {p for p in members if p.startswith("/var/lib/bootenv")}
        assert "/usr/bin/gawk" in members and DB_STATUS in own
        assert own <= {"/var/lib/bootenv", "/var/lib/bootenv/dpkg", DB_STATUS}
        assert not members & {*GOLD_LINKS, "/var/lib/dpkg/alternatives/awk"}  # the OS's now
        assert [p.name for p in (root / "var/lib/bootenv/alternatives").iterdir()] == ["db"]
        # (b) db laid out: the gold's links and entries.
        res = layout(LayoutConfig(str(out), ("db",), root), activator=lambda root, units: [])
        assert res.ok, res
        assert res.components[0].warnings == ()
        assert _links(root) == GOLD_LINKS
        assert (db / "awk").read_text() == AWK and (db / "editor").read_text() == EDITOR
        assert resolve("/usr/bin/awk", disk_links(root)) == "/usr/bin/gawk"

    # The single image has the gold's groups whole, and no record to merge.
    assert m.single is not None
    restore_fs(out, m.single, tmp_path / "single.img")
    with mounted(tmp_path / "single.img", tmp_path / "mnt-single") as single:
        assert _links(single) == GOLD_LINKS
        db = single / "var/lib/dpkg/alternatives"
        assert (db / "awk").read_text() == AWK and (db / "editor").read_text() == EDITOR
        assert not (single / "var/lib/bootenv/alternatives").exists()
