"""The build cache: keys, and pruning what older inputs built."""

from __future__ import annotations

import os
from pathlib import Path

from bootenv.cache import prune, stale_builds


def test_prune_keeps_the_newest_of_its_pattern_and_nothing_else_is_touched(tmp_path: Path) -> None:
    for i, name in enumerate(("gold-aaaaaaaaaaaa", "gold-bbbbbbbbbbbb", "gold-cccccccccccc")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "gold-aaaaaaaaaaaa-dense").mkdir()  # another kind: not matched
    (tmp_path / "other").mkdir()
    gone = prune(tmp_path, "gold-" + "?" * 12, keep=1)
    assert [p.name for p in gone] == ["gold-aaaaaaaaaaaa", "gold-bbbbbbbbbbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gold-aaaaaaaaaaaa-dense",
        "gold-cccccccccccc",
        "other",
    ]
    assert prune(tmp_path, "gold-" + "?" * 12, keep=1) == []
    assert prune(tmp_path / "missing", "*", keep=0) == []


def test_stale_builds_keeps_the_newest() -> None:
    builds = {"ramdisk-a": 10.0, "ramdisk-b": 30.0, "ramdisk-c": 20.0, "ramdisk-d": 5.0}
    assert stale_builds(builds, keep=2) == ["ramdisk-a", "ramdisk-d"]
    assert stale_builds(builds, keep=4) == []
    assert stale_builds({}, keep=1) == []
