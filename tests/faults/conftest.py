"""Fixtures of the fault-injection suite: fast retries, a recorded backoff, a clean tree."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import bootenv.httpreader as httpreader_mod
import bootenv.source as source_mod
from bootenv.httpreader import RetryPolicy
from tests.faults.helpers import FAST, build_image, run_layout, tree
from tests.unit.httpfault import FaultServer


@dataclass(frozen=True)
class _FastPolicy(RetryPolicy):
    attempts: int = FAST.attempts
    backoff: float = FAST.backoff
    max_backoff: float = FAST.max_backoff
    timeout: float = FAST.timeout


class SleepLog:
    """Stands in for bootenv.httpreader's `backoff_wait`: records each delay, then waits it."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def backoff_wait(self, stop: threading.Event, seconds: float) -> bool:
        self.delays.append(seconds)
        return stop.wait(seconds)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> SleepLog:
    """Every HttpSource made during the test (layout's own included) retries fast."""
    monkeypatch.setattr(source_mod, "RetryPolicy", _FastPolicy)
    sleeps = SleepLog()
    monkeypatch.setattr(httpreader_mod, "backoff_wait", sleeps.backoff_wait)
    return sleeps


@dataclass(frozen=True)
class Image:
    dir: Path
    clean: dict[str, tuple[object, ...]]  # the tree of an undisturbed layout of "all"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("faults")
    img = build_image(base / "img")
    res, _ = run_layout(str(img), base / "clean")
    assert res.ok and [c.status for c in res.components] == ["done", "done"]
    return Image(img, tree(base / "clean"))


@pytest.fixture
def srv(image: Image) -> Iterator[FaultServer]:
    with FaultServer(image.dir) as server:
        yield server
