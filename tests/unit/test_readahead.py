"""Readahead: what it warms (within the budget), and that it stops quietly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from bootenv.readahead import Readahead, plan


def test_plan_keeps_the_order_and_stops_at_the_budget() -> None:
    files = [("/a", 10), ("/b", 20), ("/c", 5), ("/d", 1)]
    assert plan(files, 35) == ["/a", "/b", "/c"]
    assert plan(files, 29) == ["/a"]  # stops at the first that does not fit: order matters more
    assert plan(files, 0) == []
    assert plan([], 100) == []


def test_skips_a_file_it_cannot_open_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file a live machine removed since the scan (here: one it may not open) is left
    out of the image; the files after it are still read ahead."""
    (tmp_path / "a").write_bytes(b"a" * 10000)
    (tmp_path / "link").symlink_to("a")  # O_NOFOLLOW: not a regular file any more
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *_: advised.append(os.fstat(fd).st_ino))
    caplog.set_level(logging.DEBUG, logger="bootenv.readahead")
    with Readahead(tmp_path, ["/a", "/link", "/gone", "/a"]) as ra:
        ra._thread.join(5)
        assert not ra._thread.is_alive()
    assert "readahead skips /link" in caplog.text and "readahead skips /gone" in caplog.text
    assert advised == [(tmp_path / "a").stat().st_ino] * 2
