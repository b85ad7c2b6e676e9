"""The dpkg status merge never leaves the root, whatever symlink an archive planted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootenv.dpkgmerge import merge_component_status
from bootenv.layout import LayoutConfig, layout
from bootenv.paxread import ArchiveError
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image, sym

PARAGRAPH = "Package: pwned\nStatus: install ok installed\nVersion: 1\n"


def test_a_dpkg_directory_the_archive_made_a_symlink_fails_its_component(tmp_path: Path) -> None:
    """The target has no /var/lib/dpkg yet: the archive's symlink there is placed, and
    the merge would write the status file wherever it points."""
    (tmp_path / "outside").mkdir()
    evil = Comp(
        "evil",
        [d("var"), d("var/lib"), sym("var/lib/dpkg", "../../../outside")],
        units=("evil.service",),
        status=PARAGRAPH,
    )
    good = Comp("good", [d("srv"), f("srv/ok", "fine")], units=("good.service",))
    image = make_image(tmp_path / "img", [evil, good])
    root = tmp_path / "root"
    root.mkdir()
    act = ActivatedUnits()
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=act)
    assert os.listdir(tmp_path / "outside") == []
    by_name = {c.name: c for c in res.components}
    assert by_name["evil"].status == "failed" and by_name["evil"].packages == ()
    assert (
        by_name["evil"].error
        == "dpkg status not merged: refused: /var/lib/dpkg is a symlink or not a directory"
    )
    assert by_name["good"].status == "done"
    assert act.units == ["good.service"]  # the refused component is not activated
    failure = res.failure()
    assert failure is not None and "\n" not in str(failure) and "evil: dpkg status not merged" in str(failure)


def _component_status(root: Path, text: str) -> None:
    (root / "var/lib/bootenv/dpkg").mkdir(parents=True)
    (root / "var/lib/bootenv/dpkg/c.status").write_text(text)


@pytest.mark.parametrize("planted", ["var/lib/dpkg", "var/lib", "var"])
def test_the_status_file_is_written_through_no_symlinked_directory(tmp_path: Path, planted: str) -> None:
    root = tmp_path / "root"
    _component_status(root, PARAGRAPH)
    outside = tmp_path / "outside"
    outside.mkdir()
    if planted != "var":
        (root / planted).parent.mkdir(parents=True, exist_ok=True)
    target = root / planted
    if target.exists():  # var and var/lib hold the component's status: move them out
        os.rename(target, outside / "moved")
        os.symlink(outside / "moved", target)
    else:
        os.symlink(outside, target)
    with pytest.raises(ArchiveError, match=r"^refused: /var(/lib)?(/dpkg)? is a symlink or not a directory$"):
        merge_component_status(root, "c")
    assert not any(p.name == "status" for p in outside.rglob("*"))


def test_a_symlinked_status_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _component_status(root, PARAGRAPH)
    (root / "var/lib/dpkg").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, root / "var/lib/dpkg/status")
    with pytest.raises(ArchiveError, match=r"^refused: /var/lib/dpkg/status is a symlink$"):
        merge_component_status(root, "c")
    assert victim.read_text() == "precious\n"


def test_the_component_status_is_not_read_through_a_symlink(tmp_path: Path) -> None:
    """Its paragraphs come from the component's own file, never one a symlink points at."""
    root = tmp_path / "root"
    (root / "var/lib/bootenv").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.status").write_text(PARAGRAPH)
    os.symlink(elsewhere, root / "var/lib/bootenv/dpkg")
    with pytest.raises(
        ArchiveError, match=r"^refused: /var/lib/bootenv/dpkg is a symlink or not a directory$"
    ):
        merge_component_status(root, "c")
    assert not (root / "var/lib/dpkg/status").exists()
