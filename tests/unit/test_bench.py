"""A smoke test of the benchmark harness on tiny inputs (no timings are asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import requests

from bench.harness import Result, Stats, measure, save, table
from bench.throttle import serve


def test_measure_table_and_save(tmp_path: Path) -> None:
    sample = measure([sys.executable, "-c", "x = bytearray(20 << 20)"])
    assert sample.seconds > 0 and sample.max_rss_kb > 20 << 10  # the child's own peak RSS
    r = Result("smoke", "a tiny run", {"python (s)": Stats.of([sample.seconds, sample.seconds * 2])})
    r.ratio, r.ratio_label, r.target, r.passed = 1.5, "x", ">= 1.0", True
    r.notes.append("a note")
    text = table([r])
    assert "smoke" in text and "1.50 x" in text and "* smoke: a note" in text
    path = save([r], tmp_path, {"runs": 2})
    doc = json.loads(path.read_text())
    assert doc["results"][0]["measurements"]["python (s)"]["runs"] == 2
    assert (tmp_path / "latest.json").read_text() == path.read_text()


def test_throttled_server_serves_ranges(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1024
    (tmp_path / "blob").write_bytes(data)
    with serve(tmp_path, per_connection=50e6, per_host=100e6) as url:
        assert requests.get(f"{url}/blob", timeout=10).content == data
        part = requests.get(f"{url}/blob", headers={"Range": "bytes=1000-"}, timeout=10)
        assert part.status_code == 206 and part.content == data[1000:]
        assert requests.get(f"{url}/../etc/passwd", timeout=10).status_code == 404
