"""Progress reporting (bootenv/log.py)."""

from __future__ import annotations

import logging

import pytest

from bootenv.log import Progress


def test_progress_never_shows_past_a_hundred_percent(caplog: pytest.LogCaptureFixture) -> None:
    """A total that is an estimate (a component's tar stream) may be passed."""
    bar = Progress("packing web", 1000, interval=0.0)
    with caplog.at_level(logging.INFO):
        bar.update(4610)
    assert "packing web: 100%" in caplog.text and "461%" not in caplog.text
