"""Fuzz the manifest and block-map parsers: any input ends in a one-line ManifestError.

Inputs that ever crashed a parser are kept in REGRESSIONS and run every time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootenv.blockmap import parse_blockmap
from bootenv.manifest import ManifestError, parse_manifest
from tests.unit.test_manifest import make_manifest

REGRESSIONS: list[str] = [
    '{"format": "bootenv-composite", "version": 1.0}',
    '{"format": "bootenv-composite", "version": true}',
    '{"format": "bootenv-composite", "version": 1, "source": [], "rootfs": {}, "os": {}, "components": []}',
    '{"version": 1, "image_size": 4096, "block_size": 4096, "ranges": [[0, 4096, null]]}',
    '{"version": 1, "image_size": 1e400, "block_size": 4096, "ranges": []}',
    "[" * 100000,
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations(doc: Any) -> list[tuple[list[Any], Any]]:
    """Every (path, value) leaf or node of a JSON document."""
    out: list[tuple[list[Any], Any]] = [([], doc)]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += [([k, *p], x) for p, x in _mutations(v)]
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += [([i, *p], x) for p, x in _mutations(v)]
    return out


GOOD = json.loads(make_manifest().to_json())
PATHS = [p for p, _ in _mutations(GOOD) if p]


def _set(doc: Any, path: list[Any], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _parses_or_fails_cleanly(parse: Any, text: str | bytes) -> None:
    try:
        parse(text)
    except ManifestError as exc:
        assert "\n" not in str(exc)
    except RecursionError:
        pytest.fail("parser recursed without bound")


@pytest.mark.parametrize("text", REGRESSIONS)
def test_regressions(text: str) -> None:
    _parses_or_fails_cleanly(parse_manifest, text)
    _parses_or_fails_cleanly(parse_blockmap, text)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), json_values)
def test_mutated_manifest(path: list[Any], value: Any) -> None:
    _parses_or_fails_cleanly(parse_manifest, json.dumps(_set(GOOD, path, value)))


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _parses_or_fails_cleanly(parse_manifest, data)
    _parses_or_fails_cleanly(parse_blockmap, data)


@settings(deadline=None)
@given(json_values)
def test_random_json(value: Any) -> None:
    _parses_or_fails_cleanly(parse_manifest, json.dumps(value))
    _parses_or_fails_cleanly(parse_blockmap, json.dumps(value))
