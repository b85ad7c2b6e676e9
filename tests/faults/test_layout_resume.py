"""Connections cut at random offsets while `layout` streams: Range resume, same tree.

write-os has the same property proven at 24 seeds in
tests/unit/test_oswrite.py::test_dropped_connection_resumes_at_the_exact_offset.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bootenv.manifest import parse_manifest
from tests.conftest import seeds
from tests.faults.conftest import Image
from tests.faults.helpers import blob_of, component, run_layout, tree
from tests.hostile.kit import make_image
from tests.unit.httpfault import Fault, FaultServer

# Tens of seconds of layouts cut and resumed: `make test` and `make slow` run them (the unit
# tier's test_layout_chunks cuts a chunk and test_oswrite a stream in `make check` too).
pytestmark = pytest.mark.slow

SEEDS = seeds(6, 24)


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_at_random_offsets_resumes_to_the_clean_tree(
    image: Image, srv: FaultServer, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    cuts: dict[str, list[int]] = {}
    for name in ("good", "bad"):
        file, size = blob_of(image.dir, name)
        drops = sorted(rng.sample(range(1, size), rng.randint(1, 3)))
        if seed == 0:
            drops = [1, size // 2, size - 1]  # the edges: first byte, last byte
        cuts[file] = drops
        srv.faults[file] = Fault(drops=list(drops))
    streams = 1 + seed % 2  # in-process and in parallel stream processes
    res, act = run_layout(srv.url, tmp_path / "root", streams=streams)
    assert res.ok, [c.error for c in res.components]
    assert tree(tmp_path / "root") == image.clean
    assert act.calls == [(tmp_path / "root", ["bad.service", "good.service"])]
    for file, drops in cuts.items():
        reqs = srv.requests_for(file)
        assert [r.start for r in reqs] == [0, *drops], "each resume asks for the exact byte it lost"
        assert [r.status for r in reqs] == [200] + [206] * len(drops)


def test_server_ignoring_range_after_a_cut_still_gives_the_clean_tree(
    image: Image, srv: FaultServer, tmp_path: Path
) -> None:
    file, size = blob_of(image.dir, "good")
    srv.faults[file] = Fault(drops=[size // 3, 2 * size // 3], ignore_range=True)
    res, _ = run_layout(srv.url, tmp_path / "root")
    assert res.ok
    assert tree(tmp_path / "root") == image.clean
    assert [r.status for r in srv.requests_for(file)] == [200, 200, 200]


@pytest.fixture(scope="module")
def chunked(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same components, cut into chunks of about 16 KiB of tar (dozens per blob)."""
    return make_image(
        tmp_path_factory.mktemp("chunked") / "img", [component(n, 7) for n in ("good", "bad")], chunk=16 << 10
    )


@pytest.mark.parametrize("seed", seeds(4, 12))
def test_cuts_inside_chunks_resume_inside_the_chunk_to_the_clean_tree(
    image: Image, chunked: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    m = parse_manifest((chunked / "manifest.json").read_text())
    expected: dict[str, list[int]] = {}
    with FaultServer(chunked) as srv:
        for comp in m.components:
            assert len(comp.chunks) > 5
            drops = sorted(rng.sample(range(1, comp.data.size), rng.randint(1, 4)))
            srv.faults[comp.data.file] = Fault(drops=list(drops))
            expected[comp.data.file] = sorted([c.offset for c in comp.chunks] + drops)
        res, _ = run_layout(srv.url, tmp_path / "root", streams=1 + seed % 3)
    assert res.ok, [c.error for c in res.components]
    assert tree(tmp_path / "root") == image.clean
    for file, starts in expected.items():
        reqs = srv.requests_for(file)
        assert sorted(r.start for r in reqs) == starts, "one range per chunk, one resume per cut"
        assert {r.status for r in reqs} == {206}
