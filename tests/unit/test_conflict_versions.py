"""A conflict record follows the component's versions: one resolved for a version is not
reported nor stored again when a layout finds that version again, whichever way the
layout comes to it (laid out again, or found laid out by an earlier run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bootenv import conflicts
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
    conflicts.resolve(root, cid, "existing", None)
    assert not stored.exists()
    (root / STATE_DIR / "x.json").unlink()
    events: list[dict[str, Any]] = []
    (x,) = run(image, root, events).components
    assert (x.status, x.conflicts) == ("done", ())
    assert [e for e in events if e.get("event") == "conflict"] == []
    assert not stored.exists() and (root / "usr/tool").read_bytes() == b"os tool"
    assert (conflicts.load(root, cid).resolution or {}).get("keep") == "existing"
