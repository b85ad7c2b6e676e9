"""Readahead: what it warms (within the budget), and that it stops quietly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bootenv.readahead import Readahead, plan


def test_plan_keeps_the_order_and_stops_at_the_budget() -> None:
    files = [("/a", 10), ("/b", 20), ("/c", 5), ("/d", 1)]
    assert plan(files, 35) == ["/a", "/b", "/c"]
    assert plan(files, 29) == ["/a"]  # stops at the first that does not fit: order matters more
    assert plan(files, 0) == []
    assert plan([], 100) == []


def test_stops_at_a_file_it_cannot_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a").write_bytes(b"a" * 10000)
    (tmp_path / "link").symlink_to("a")  # O_NOFOLLOW: not a regular file any more
    caplog.set_level(logging.DEBUG, logger="bootenv.readahead")
    with Readahead(tmp_path, ["/a", "/link", "/a"]) as ra:
        ra._thread.join(5)
        assert not ra._thread.is_alive()
    assert "readahead stops at /link" in caplog.text
