"""A component's units are held back (a systemd drop-in and its flag) while it is laid out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootenv.hold import HELD_DIR, hold, release
from bootenv.layout import LayoutConfig, layout
from bootenv.paxread import ArchiveError
from tests.hostile.kit import Comp, d, f, make_image, sym

DROP_IN = "etc/systemd/system/{unit}.d/bootenv-hold-{comp}.conf"


def _drop_in(root: Path, unit: str, comp: str) -> Path:
    return root / DROP_IN.format(unit=unit, comp=comp)


def test_hold_writes_a_condition_on_a_flag_and_release_removes_both(tmp_path: Path) -> None:
    hold(tmp_path, {"db": ("mariadb.service", "mariadb.socket"), "web": ("apache2.service",), "none": ()})
    assert sorted(os.listdir(tmp_path / HELD_DIR)) == ["db", "web"]
    text = _drop_in(tmp_path, "mariadb.socket", "db").read_text()
    assert "[Unit]\nConditionPathExists=!/var/lib/bootenv/layout/held/db\n" in text
    assert _drop_in(tmp_path, "apache2.service", "web").exists()
    release(tmp_path, "db", ("mariadb.service", "mariadb.socket"))
    assert os.listdir(tmp_path / HELD_DIR) == ["web"]
    assert not (tmp_path / "etc/systemd/system/mariadb.service.d").exists()  # emptied, removed
    assert _drop_in(tmp_path, "apache2.service", "web").exists()  # another component's: held
    release(tmp_path, "db", ("mariadb.service", "mariadb.socket"))  # twice: nothing to do


def test_a_unit_directory_that_holds_the_admins_drop_ins_stays(tmp_path: Path) -> None:
    own = tmp_path / "etc/systemd/system/mariadb.service.d/limits.conf"
    own.parent.mkdir(parents=True)
    own.write_text("[Service]\nLimitNOFILE=65536\n")
    hold(tmp_path, {"db": ("mariadb.service",)})
    release(tmp_path, "db", ("mariadb.service",))
    assert os.listdir(own.parent) == ["limits.conf"]


def test_a_name_that_is_no_unit_is_not_held_and_nothing_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    hold(root, {"evil": ("../../../../escaped.service", "a/b.service", "ok.service")})
    assert not (tmp_path / "escaped.service.d").exists()
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == ["ok.service.d"]


def test_a_symlinked_unit_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/systemd").mkdir(parents=True)
    (root / "etc/systemd/system").symlink_to(outside)
    with pytest.raises(ArchiveError, match="symlink"):
        hold(root, {"db": ("mariadb.service",)})
    assert os.listdir(outside) == []


def test_a_layout_releases_what_it_laid_out_before_activating_and_keeps_a_failed_one_held(
    tmp_path: Path,
) -> None:
    """`evil` fails (its dpkg merge is refused): its units stay held, so a boot does not
    start them from what it left. `good` is released before its units are started."""
    (tmp_path / "outside").mkdir()
    evil = Comp(
        "evil",
        [d("var"), d("var/lib"), sym("var/lib/dpkg", "../../../outside")],
        units=("evil.service",),
        status="Package: pwned\nStatus: install ok installed\nVersion: 1\n",
    )
    good = Comp("good", [d("srv"), f("srv/ok", "fine")], units=("good.service",))
    image = make_image(tmp_path / "img", [evil, good])
    root = tmp_path / "root"
    root.mkdir()
    seen: dict[str, bool] = {}

    def activator(root: Path, units: list[str]) -> list[str]:
        seen["good held"] = (root / HELD_DIR / "good").exists() or _drop_in(
            root, "good.service", "good"
        ).exists()
        seen["evil held"] = (root / HELD_DIR / "evil").exists() and _drop_in(
            root, "evil.service", "evil"
        ).exists()
        return []

    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=activator)
    assert {c.name: c.status for c in res.components} == {"evil": "failed", "good": "done"}
    assert seen == {"good held": False, "evil held": True}
    assert os.listdir(root / HELD_DIR) == ["evil"]
    # Laid out again (the component's problem fixed or not), a done component is not held again.
    layout(LayoutConfig(str(image), ("good",), root, streams=1), activator=activator)
    assert os.listdir(root / HELD_DIR) == ["evil"]
