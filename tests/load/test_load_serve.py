"""Load on `bootenv serve`: 32 clients streaming the image, 200 agents posting events."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bootenv.serve import ServeConfig, running
from bootenv.state import Store
from tests.load.loadkit import build_image, mac_of, post_events, stream_clients

CLIENTS = 32
AGENTS = 200
EVENTS = 10

pytestmark = pytest.mark.slow


def test_32_clients_stream_the_image_byte_identically(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.load.loadkit")
    built = build_image(tmp_path / "images")
    work = tmp_path / "clients"
    work.mkdir()
    with running(ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0)) as server:
        url = f"http://127.0.0.1:{server.port}/images/lamp"
        result = stream_clients(url, built, work, clients=CLIENTS)
    assert result.errors == ()
    assert result.mismatches == ()
    assert len(result.clients) == CLIENTS
    assert all(set(c.hashes) == {"os", "apache", "mysql", "php"} for c in result.clients)
    per_client = built.manifest.os.data.size + sum(c.data.size for c in built.manifest.components)
    assert result.bytes == CLIENTS * per_client
    assert any("MiB/s aggregate" in r.getMessage() for r in caplog.records)


def test_200_agents_posting_at_once_lose_and_reorder_nothing(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    state = tmp_path / "state"
    with running(ServeConfig(images=tmp_path / "images", state=state, port=0)) as server:
        result = post_events(f"http://127.0.0.1:{server.port}", agents=AGENTS, events=EVENTS)
    assert result.failures == []
    store = Store(state)
    for i in range(AGENTS):
        mac = mac_of(i)
        got = [e["data"]["n"] for e in store.events(mac) if "data" in e]
        assert got == list(range(EVENTS)), f"{mac}: events lost or reordered"
        machine = store.get(mac)
        assert machine is not None and machine.events == EVENTS
    assert len(store.all()) == AGENTS
