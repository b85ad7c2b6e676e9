"""A killed layout's temp names go at the next layout, whichever components that one lays out."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from bootenv import extract
from bootenv.journal import TEMPS_DIR, DirLog
from bootenv.layout import LayoutConfig, layout
from bootenv.log import human_bytes
from tests.hostile.kit import Comp, d, f, make_image

BIG = os.urandom(1 << 20)


def _no_activation(root: Path, units: list[str]) -> list[str]:
    return []


def _apache(first: tuple[str, ...] = ()) -> Comp:
    """`first`: more files, placed before the others (another build: its temps are named
    by other indices)."""
    members = [d("etc"), d("etc/apache2"), d("srv"), d("srv/www"), d("usr"), d("usr/sbin")]
    members += [f(f"etc/apache2/{name}", name) for name in first]
    members += [f("etc/apache2/apache2.conf", "Listen 80\n"), f("srv/www/index.html", "hi")]
    members += [f("usr/sbin/apache2", BIG), f("usr/sbin/apache2ctl", "#!/bin/sh\n")]
    return Comp("apache", members)


def _mysql() -> Comp:
    return Comp(
        "mysql", [d("etc"), d("etc/mysql"), f("etc/mysql/my.cnf", "[mysqld]\n"), f("usr/sbin/mysqld", "m")]
    )


def _target(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)  # the OS's: apache's temps go there too
    return root


def _die_in_a_big_write(image: str, root: str, names: tuple[str, ...]) -> None:
    """In a forked child: a layout killed -9 once the first MiB-sized file it writes is
    partly in, under its temp name."""
    write_all = extract.write_all

    def write_then_die(fd: int, data: bytes | memoryview) -> None:
        write_all(fd, data)
        if len(data) >= 4096:
            os.kill(os.getpid(), signal.SIGKILL)

    extract.write_all = write_then_die  # type: ignore[assignment]
    layout(LayoutConfig(image, names, Path(root), streams=1), activator=_no_activation)


def _killed(image: Path, root: Path, names: tuple[str, ...] = ("apache", "mysql")) -> None:
    proc = multiprocessing.get_context("fork").Process(
        target=_die_in_a_big_write, args=(str(image), str(root), names)
    )
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


def _temps(root: Path, component: str | None) -> list[str]:
    """Every entry under `root` (no symlink followed) named as `component`'s temps are
    (None: any layout temp)."""
    prefix = ".bootenv~" if component is None else f".bootenv~{component}~"
    return sorted(
        str(Path(top, name).relative_to(root))
        for top, dirs, files in os.walk(root)
        for name in dirs + files
        if name.startswith(prefix)
    )


def test_a_layout_without_the_killed_component_removes_its_temps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image(tmp_path / "img", [_apache(), _mysql()])
    root = _target(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("not the root's")
    _killed(image, root)
    [partial] = _temps(root, "apache")
    assert partial.startswith("usr/sbin/.bootenv~apache~")  # half of the big file, in the OS's directory
    freed = (root / partial).lstat().st_blocks * 512
    # What kills at other points leave, in a directory apache made: an empty directory (a
    # killed mkdir), a symlink (to outside the root), a fifo.
    (root / "etc/apache2/.bootenv~apache~70").mkdir()
    (root / "etc/apache2/.bootenv~apache~71").symlink_to(outside / "kept")
    os.mkfifo(root / "etc/apache2/.bootenv~apache~72")
    # Where apache never made a temp: a layout does not look there (no walk of the tree).
    (root / "opt/elsewhere").mkdir(parents=True)
    (root / "opt/elsewhere/.bootenv~apache~9").write_text("never looked at")

    with caplog.at_level(logging.INFO, logger="bootenv.sweep"):
        res = layout(LayoutConfig(str(image), ("mysql",), root, streams=1), activator=_no_activation)

    assert res.ok and [c.name for c in res.components] == ["mysql"]
    assert _temps(root, "apache") == ["opt/elsewhere/.bootenv~apache~9"]
    assert (outside / "kept").read_text() == "not the root's"
    # What the killed run placed stays as it is: only a layout of apache finishes it.
    assert (root / "etc/apache2/apache2.conf").read_text() == "Listen 80\n"
    assert (root / "srv/www/index.html").read_text() == "hi"
    assert not (root / "usr/sbin/apache2").exists()
    assert (root / "usr/sbin/mysqld").read_text() == "m"
    [line] = [r for r in caplog.records if r.name == "bootenv.sweep"]
    assert line.levelno == logging.WARNING
    assert (
        f"apache: a layout did not finish it: removed 4 temp entries ({human_bytes(freed)}) it left in "
        in line.message
    )
    assert "half laid out" in line.message

    # Swept: the next layout looks in none of apache's directories again.
    (root / "usr/sbin/.bootenv~apache~99").write_text("planted after the sweep")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bootenv.sweep"):
        assert layout(LayoutConfig(str(image), ("mysql",), root, streams=1), activator=_no_activation).ok
    assert (root / "usr/sbin/.bootenv~apache~99").exists()
    assert not [r for r in caplog.records if r.name == "bootenv.sweep"]
    # A layout of apache finishes it, and its log of temps is done with.
    assert layout(LayoutConfig(str(image), ("apache",), root, streams=1), activator=_no_activation).ok
    assert (root / "usr/sbin/apache2").read_bytes() == BIG
    assert not (root / TEMPS_DIR / "apache").exists()


def test_a_symlink_in_a_swept_directorys_place_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image(tmp_path / "img", [_apache(), _mysql()])
    root = _target(tmp_path)
    _killed(image, root)
    # srv, and srv/www under it, are directories apache logged: srv is now a symlink
    # to a tree outside the root that holds temp names of its own.
    outside = tmp_path / "outside"
    (outside / "www").mkdir(parents=True)
    (outside / ".bootenv~apache~1").write_text("outside")
    (outside / "www/.bootenv~apache~2").write_text("outside")
    (root / "srv/www/index.html").unlink()
    (root / "srv/www").rmdir()
    (root / "srv").rmdir()
    (root / "srv").symlink_to(outside)

    with caplog.at_level(logging.INFO, logger="bootenv.sweep"):
        assert layout(LayoutConfig(str(image), ("mysql",), root, streams=1), activator=_no_activation).ok

    assert (outside / ".bootenv~apache~1").read_text() == "outside"
    assert (outside / "www/.bootenv~apache~2").read_text() == "outside"
    assert (root / "srv").is_symlink()
    assert not list((root / "usr/sbin").glob(".bootenv~apache~*"))  # the rest was swept
    assert "(2 not looked in: a symlink or not a directory on the way)" in caplog.text


def test_a_component_the_image_no_longer_has_is_swept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _target(tmp_path)
    _killed(make_image(tmp_path / "old", [_apache(), _mysql()]), root)
    assert list((root / "usr/sbin").glob(".bootenv~apache~*"))
    other = make_image(tmp_path / "new", [_mysql()])
    with caplog.at_level(logging.INFO, logger="bootenv.sweep"):
        assert layout(LayoutConfig(str(other), "all", root, streams=1), activator=_no_activation).ok
    assert not _temps(root, "apache")
    assert (
        "this image has no component apache: the files that layout placed stay, half laid out" in caplog.text
    )


def test_another_build_of_the_killed_component_removes_the_temps_it_would_not_make(tmp_path: Path) -> None:
    root = _target(tmp_path)
    _killed(make_image(tmp_path / "old", [_apache()]), root, ("apache",))
    [partial] = list((root / "usr/sbin").glob(".bootenv~apache~*"))
    # Another build: three files first, so no member of it has the temp name left there.
    newer = make_image(tmp_path / "new", [_apache(first=("a.conf", "b.conf", "c.conf"))])
    assert layout(LayoutConfig(str(newer), "all", root, streams=1), activator=_no_activation).ok
    assert not partial.exists()
    assert not _temps(root, None)
    assert (root / "usr/sbin/apache2").read_bytes() == BIG


def test_a_killed_run_logged_only_by_its_directories_is_swept_there(tmp_path: Path) -> None:
    """A run of a bootenv that logged only the directories a component made (its DirLog):
    those, and their parents, where its directories' temps were."""
    root = _target(tmp_path)
    (root / "opt/old").mkdir(parents=True)
    with DirLog(root, "old", "1" * 64) as dirs:
        dirs.add("opt/old", 5)
    (root / "opt/old/.bootenv~old~3").write_text("partial")
    (root / "opt/.bootenv~old~4").mkdir()
    image = make_image(tmp_path / "img", [_mysql()])
    assert layout(LayoutConfig(str(image), "all", root, streams=1), activator=_no_activation).ok
    assert not _temps(root, "old")
    assert (root / TEMPS_DIR / "old").read_bytes() == b""  # swept: the DirLog stays for a layout of it


def test_a_temp_that_cannot_go_is_named_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image(tmp_path / "img", [_apache(), _mysql()])
    root = _target(tmp_path)
    _killed(image, root)
    (root / "etc/apache2/.bootenv~apache~60").mkdir()  # not a killed run's: something is in it
    (root / "etc/apache2/.bootenv~apache~60/x").write_text("x")
    with caplog.at_level(logging.INFO, logger="bootenv.sweep"):
        assert layout(LayoutConfig(str(image), ("mysql",), root, streams=1), activator=_no_activation).ok
    assert (root / "etc/apache2/.bootenv~apache~60/x").exists()
    assert (
        "apache: 1 temp entries not removed (the next layout tries again): /etc/apache2/.bootenv~apache~60"
        in (caplog.text)
    )
    assert (root / TEMPS_DIR / "apache").stat().st_size > 0


def test_a_spill_file_a_kill_left_in_the_root_goes(tmp_path: Path) -> None:
    root = _target(tmp_path)
    (root / ".bootenv~piece-k3x9_q1z").write_bytes(b"\0" * 4096)  # killed between mkstemp and unlink
    image = make_image(tmp_path / "img", [_mysql()])
    assert layout(LayoutConfig(str(image), "all", root, streams=1), activator=_no_activation).ok
    assert not (root / ".bootenv~piece-k3x9_q1z").exists()
