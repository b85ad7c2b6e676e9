"""Fixtures shared by the unit tests of the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_manifest import make_manifest


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A composite image that is only its manifest: enough for inspect and the CLI's errors."""
    d = tmp_path / "img"
    d.mkdir()
    (d / "manifest.json").write_text(make_manifest().to_json())
    return d
