"""Block maps: range planning, strict parsing, and packing a sparse image."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import zstandard

from bootenv.blockmap import MAX_RANGE, BlockMap, Range, pack_image, parse_blockmap, plan_ranges
from bootenv.manifest import ManifestError


def test_plan_aligns_merges_and_splits() -> None:
    assert plan_ranges([(100, 10)], 4096, 1 << 20) == [(0, 4096)]
    assert plan_ranges([(0, 4096), (4096, 10)], 4096, 1 << 20) == [(0, 8192)]
    assert plan_ranges([(0, 10), (8192, 10)], 4096, 1 << 20) == [(0, 4096), (8192, 4096)]
    big = plan_ranges([(0, MAX_RANGE * 2 + 4096)], 4096, 1 << 30)
    assert big == [(0, MAX_RANGE), (MAX_RANGE, MAX_RANGE), (2 * MAX_RANGE, 4096)]
    # The last range never runs past the end of the image.
    assert plan_ranges([(5000, 10)], 4096, 6000) == [(4096, 1904)]


def test_pack_sparse_image(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    size = 64 << 20
    chunks = {0: os.urandom(5000), 20 << 20: b"\x01" * 4096, (40 << 20) + 123: os.urandom(9000)}
    with open(image, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    out = tmp_path / "os.zst"
    with open(out, "wb") as f:
        bmap = pack_image(image, f, block_size=4096)
    assert bmap.image_size == size
    assert bmap.mapped < 1 << 20  # only the data was packed, not the holes
    stream = zstandard.ZstdDecompressor().decompress(out.read_bytes(), max_output_size=size)
    assert len(stream) == bmap.mapped
    raw = image.read_bytes()
    pos = 0
    for r in bmap.ranges:
        piece = stream[pos : pos + r.length]
        assert piece == raw[r.offset : r.offset + r.length]
        assert hashlib.sha256(piece).hexdigest() == r.sha256
        pos += r.length
    # Every chunk of data is covered by some range.
    for off, data in chunks.items():
        assert any(r.offset <= off and off + len(data) <= r.offset + r.length for r in bmap.ranges)
    assert parse_blockmap(bmap.to_json()) == bmap


def good() -> dict[str, object]:
    bm = BlockMap(1 << 20, 4096, (Range(0, 4096, "a" * 64), Range(8192, 4096, "b" * 64)))
    result: dict[str, object] = json.loads(bm.to_json())
    return result


@pytest.mark.parametrize(
    "ranges",
    [
        [[8192, 4096, "a" * 64], [0, 4096, "b" * 64]],  # not sorted
        [[0, 8192, "a" * 64], [4096, 4096, "b" * 64]],  # overlapping
        [[100, 4096, "a" * 64]],  # not aligned
        [[0, 0, "a" * 64]],  # empty
        [[0, 2 << 20, "a" * 64]],  # past the end of the image
        [[0, 4096, "short"]],
        [[0, 4096, "z" * 64]],  # not hex
        [[0, True, "a" * 64]],  # a bool is no length
        [[0, 4096]],
        "nope",
    ],
)
def test_bad_blockmaps(ranges: object) -> None:
    d = good()
    d["ranges"] = ranges
    with pytest.raises(ManifestError):
        parse_blockmap(json.dumps(d))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", 1 << 64),  # os.ftruncate raised OverflowError, with a traceback
        ("image_size", 0),
        ("image_size", -4096),
        ("image_size", True),
        ("version", True),
        ("version", 1.0),
        ("block_size", 4096.0),
    ],
)
def test_blockmap_headers_out_of_range_are_refused(key: str, value: object) -> None:
    d = good()
    d[key] = value
    if key == "image_size":
        d["ranges"] = []
    with pytest.raises(ManifestError, match=r"sizes are invalid|version"):
        parse_blockmap(json.dumps(d))


def test_blockmap_unknown_key() -> None:
    d = good()
    d["extra"] = 1
    with pytest.raises(ManifestError):
        parse_blockmap(json.dumps(d))
