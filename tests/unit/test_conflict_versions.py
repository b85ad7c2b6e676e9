"""A conflict record follows the component's versions: one resolved for a version is not
reported nor stored again when a layout finds that version again, whichever way the
layout comes to it (laid out again, or found laid out by an earlier run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bootenv import conflicts, resolution, schedule
from bootenv import layout as layout_module
from bootenv.cli import main
from bootenv.journal import STATE_DIR
from bootenv.layout import LayoutConfig, LayoutResult, layout
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image

ELF = b"\x7fELF\x02\x01\x01\0component"


def run(image: Path, root: Path, events: list[dict[str, Any]] | None = None) -> LayoutResult:
    cfg = LayoutConfig(str(image), ("x",), root)
    return layout(cfg, activator=ActivatedUnits(), emit=None if events is None else events.append)


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/tool").write_bytes(b"os tool")
    return root


def test_a_resolved_conflict_laid_out_again_is_not_reported_nor_stored_again(tmp_path: Path) -> None:
    """The component laid out again (its journal entry gone, as when another of its
    pieces failed): the conflict it finds is the one the admin resolved."""
    image = make_image(tmp_path / "img", [Comp("x", [d("usr"), f("usr/tool", ELF)])])
    root = _root(tmp_path)
    (cid,) = run(image, root).components[0].conflicts
    stored = root / conflicts.load(root, cid).stored
    resolution.resolve(root, cid, "existing", None)
    assert not stored.exists()
    (root / STATE_DIR / "x.json").unlink()
    events: list[dict[str, Any]] = []
    (x,) = run(image, root, events).components
    assert (x.status, x.conflicts) == ("done", ())
    assert [e for e in events if e.get("event") == "conflict"] == []
    assert not stored.exists() and (root / "usr/tool").read_bytes() == b"os tool"
    assert (conflicts.load(root, cid).resolution or {}).get("keep") == "existing"


def test_a_conflict_a_later_version_does_not_have_is_superseded_not_left_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Image v1 of x conflicts on /usr/tool; v2 ships what is in place. Left open, the
    record's `--keep incoming` would put v1's ELF in place."""
    v1 = make_image(tmp_path / "v1", [Comp("x", [d("usr"), f("usr/tool", ELF), f("usr/new", "1")])])
    v2 = make_image(tmp_path / "v2", [Comp("x", [d("usr"), f("usr/tool", b"os tool"), f("usr/new", "1")])])
    root = _root(tmp_path)
    (old,) = run(v1, root).components[0].conflicts
    stored = root / conflicts.load(root, old).stored
    assert stored.read_bytes() == ELF
    (x,) = run(v2, root).components
    assert (x.status, x.identical, x.conflicts) == ("done", 2, ())
    assert (conflicts.load(root, old).resolution or {}).get("keep") == "superseded"
    assert not stored.exists()
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    assert re.search(rf"{old} +x +/usr/tool +different content +superseded", capsys.readouterr().out)
    assert main(["conflicts", "show", old, "--root", str(root)]) == 0
    assert "resolved: superseded at " in capsys.readouterr().out
    assert main(["conflicts", "resolve", old, "--keep", "incoming", "--root", str(root)]) == 2
    assert "already resolved (superseded)" in capsys.readouterr().err
    assert (root / "usr/tool").read_bytes() == b"os tool"
    # v1 again: the conflict is back, open, its version stored again.
    assert run(v1, root).components[0].conflicts == (old,)
    assert conflicts.load(root, old).resolution is None and stored.read_bytes() == ELF


@pytest.mark.parametrize("where", [(schedule, "retire"), (layout_module, "_merge_dpkg")])
def test_a_layout_killed_before_or_after_retiring_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: tuple[object, str]
) -> None:
    """Killed before the stale record is retired: the journal does not yet say x's
    files are in, and the re-run lays x out again and retires it. Killed after (in its
    dpkg merge): the re-run finds x laid out, with nothing open to report."""
    v1 = make_image(tmp_path / "v1", [Comp("x", [d("usr"), f("usr/tool", ELF)])])
    v2 = make_image(tmp_path / "v2", [Comp("x", [d("usr"), f("usr/tool", b"os tool")])])
    root = _root(tmp_path)
    (old,) = run(v1, root).components[0].conflicts

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(*where, killed)
        with pytest.raises(KeyboardInterrupt):
            run(v2, root)
    (x,) = run(v2, root).components
    assert (x.status, x.conflicts) == ("done" if where[1] == "retire" else "resumed", ())
    assert (conflicts.load(root, old).resolution or {}).get("keep") == "superseded"
    assert not (root / conflicts.load(root, old).stored).exists()
