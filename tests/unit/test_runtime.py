"""The runtime brought into the target: a package is copied with its bytecode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bootenv.runtime import _copy_module


def test_a_package_goes_into_the_target_with_its_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layout unit's Python may not write bytecode, so without the ramdisk's each
    start would compile every module again."""
    pkg = tmp_path / "src" / "shipped_pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"bytecode")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, "shipped_pkg", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    assert _copy_module("shipped_pkg", site)
    assert (site / "shipped_pkg/__init__.py").read_text() == "X = 1\n"
    assert (site / "shipped_pkg/__pycache__/__init__.cpython-311.pyc").read_bytes() == b"bytecode"
    assert not _copy_module("no_such_pkg_here", site)
