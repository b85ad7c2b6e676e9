"""`layout --root` through a symlink: the tree it names, or the running system's refusal.

Before, the root was taken as given (absolute, not resolved), and the tree writer, which
opens the root without following a symlink, failed every component ("Not a directory")
after bootenv's lock and records were already made in the target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv import target
from bootenv.cli import main
from bootenv.layout import LayoutConfig, layout
from tests.hostile.kit import Comp, d, f, make_image


def _image(tmp_path: Path) -> Path:
    comp = Comp("web", [d("etc"), d("etc/web"), f("etc/web/web.conf", "listen 80\n")], packages=("webd",))
    return make_image(tmp_path / "image", [comp])


def test_a_symlinked_root_is_the_tree_it_names(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to("real")
    result = layout(
        LayoutConfig(str(_image(tmp_path)), "all", tmp_path / "link"), activator=lambda root, units: []
    )
    assert result.failure() is None, result
    assert [c.status for c in result.components] == ["done"]
    assert (real / "etc/web/web.conf").read_text() == "listen 80\n"
    assert (tmp_path / "link").is_symlink()


def test_a_root_that_links_to_the_running_system_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(target, "provisioned", lambda root: False)
    (tmp_path / "slash").symlink_to("/")
    argv = [
        "layout",
        "--image",
        str(tmp_path / "none"),
        "--components",
        "all",
        "--root",
        str(tmp_path / "slash"),
    ]
    assert main(argv) == 2
    assert "refusing to lay out into the running system" in capsys.readouterr().err


def test_a_root_in_a_symlink_loop_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "loop").symlink_to("loop")
    argv = ["layout", "--image", str(tmp_path), "--components", "all", "--root", str(tmp_path / "loop")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bootenv: error: ") and "is not a directory" in err and err.count("\n") == 1
