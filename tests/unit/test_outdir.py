"""What a capture killed midway leaves next to its output is removed by the next capture
(never what a running capture holds), and is never packed into an image."""

from __future__ import annotations

import fcntl
import os
from contextlib import ExitStack
from pathlib import Path

import pytest

import bootenv.capture as capture_mod
from bootenv.errors import FatalError
from bootenv.exclude import Exclusions
from bootenv.outdir import inside_root, new_partial, remove_leftovers, replace_dir


def _leftover(path: Path) -> Path:
    (path / "work/os").mkdir(parents=True)
    (path / "work/os/big").write_bytes(b"\0" * 4096)
    return path


def test_leftovers_nobody_holds_are_removed_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "lamp"
    stale = [_leftover(tmp_path / ".lamp.partial-k2_x9abc"), _leftover(tmp_path / ".lamp.old-4242")]
    running = _leftover(tmp_path / ".lamp.partial-0running")
    held = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a capture that is still running
    keep = [
        tmp_path / n
        for n in (".lamp.partial-short", ".other.partial-k2_x9abc", "lamp", ".lamp.partial-k2_x9abc.d")
    ]
    for path in keep:
        path.mkdir()
    (tmp_path / ".lamp.old-1").write_text("a file: not ours")
    try:
        remove_leftovers(out)
    finally:
        os.close(held)
    assert not any(p.exists() for p in stale)
    assert running.is_dir() and all(p.is_dir() for p in keep)
    assert (tmp_path / ".lamp.old-1").is_file()


def test_a_partial_is_held_while_its_capture_runs_and_removed_after(tmp_path: Path) -> None:
    out = tmp_path / "lamp"
    with ExitStack() as stack:
        partial = new_partial(out, stack)
        assert partial.name.startswith(".lamp.partial-")
        (partial / "blob").write_bytes(b"x")
        remove_leftovers(out)  # another capture of lamp, starting meanwhile
        assert (partial / "blob").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_capture_removes_what_a_killed_one_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.fakeroot import make_tree

    gold = make_tree(tmp_path / "gold")
    images = tmp_path / "images"
    stale = _leftover(images / ".lamp.partial-k2_x9abc")

    def scan(root: Path) -> object:
        assert not stale.exists()
        raise FatalError("scanned")

    monkeypatch.setattr(capture_mod, "scan", scan)
    with pytest.raises(FatalError, match=r"^scanned$"):
        capture_mod.capture(capture_mod.CaptureConfig(root=gold, output=images / "lamp"))
    assert list(images.iterdir()) == []


def test_an_output_inside_root_leaves_its_temp_siblings_out(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    excl = Exclusions().with_patterns(inside_root(tmp_path, tmp_path / "srv/lamp"))
    for path in ("/srv/lamp/manifest.json", "/srv/.lamp.partial-k2_x9abc/x", "/srv/.lamp.old-4242/x.img.zst"):
        assert excl.reason(path, False) is not None, path
    assert excl.reason("/srv/lamp2/x", False) is None


def test_an_earlier_image_stays_when_the_new_one_cannot_take_its_place(tmp_path: Path) -> None:
    out = tmp_path / "lamp"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / ".lamp.partial-gone0000", out)
    assert (out / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lamp"]
    new = tmp_path / ".lamp.partial-k2_x9abc"
    new.mkdir()
    (new / "manifest.json").write_text('{"new": 1}')
    replace_dir(new, out)
    assert (out / "manifest.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lamp"]
