"""frames.compress_tar: zstd frames cut at tar member boundaries, one per chunk."""

from __future__ import annotations

import hashlib
import io
import random

import pytest
import zstandard

from bootenv.frames import compress_tar
from bootenv.manifest import Chunk
from bootenv.paxread import ArchiveError, PaxReader
from tests.hostile.kit import d, f, hard, sym, tar_bytes


def members(n: int = 40) -> list:  # type: ignore[type-arg]
    rng = random.Random(7)
    out = [d("etc"), d("opt"), d("opt/app", mode=0o750), d("opt/app/lib")]
    for i in range(n):
        out.append(f(f"opt/app/lib/f{i:03}", rng.randbytes(rng.randrange(100, 6000))))
        if i % 9 == 0:
            out.append(hard(f"opt/app/lib/f{i:03}.hl", f"./opt/app/lib/f{i:03}"))
    out += [sym("opt/app/current", "lib"), f("etc/app.conf", "a=1\n" * 300)]
    return out


def frames(blob: bytes, chunks: tuple[Chunk, ...]) -> list[bytes]:
    return [
        zstandard.ZstdDecompressor().decompressobj().decompress(blob[c.offset : c.offset + c.size])
        for c in chunks
    ]


def test_chunks_tile_the_blob_and_the_whole_is_the_same_tar() -> None:
    tar = tar_bytes(members())
    out = io.BytesIO()
    raw, chunks = compress_tar(io.BytesIO(tar), out, level=3, target=16 << 10)
    blob = out.getvalue()
    assert raw == len(tar)
    assert len(chunks) >= 5
    assert [c.offset for c in chunks] == [sum(c.size for c in chunks[:i]) for i in range(len(chunks))]
    assert sum(c.size for c in chunks) == len(blob)
    assert sum(c.raw_size for c in chunks) == len(tar)
    for c in chunks:
        assert hashlib.sha256(blob[c.offset : c.offset + c.size]).hexdigest() == c.sha256
    # Any zstd reads the frames as one stream: the archive is still one ordinary tar.zst.
    whole = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert whole == tar


def test_each_chunk_holds_whole_members_dirs_first_and_links_with_their_targets() -> None:
    tar = tar_bytes(members())
    out = io.BytesIO()
    _, chunks = compress_tar(io.BytesIO(tar), out, level=3, target=16 << 10)
    parts = frames(out.getvalue(), chunks)
    assert b"".join(parts) == tar
    names: list[list[tuple[str, str]]] = []
    for i, part in enumerate(parts):
        reader = PaxReader(io.BytesIO(part), partial=i < len(parts) - 1)
        got = []
        for m in reader:
            got.append((m.kind, m.name))
            if m.kind == "hardlink":
                assert ("file", m.linkname) in got  # the target is in the same chunk
            reader.read_all()
        names.append(got)
    assert names[0] == [("dir", "etc"), ("dir", "opt"), ("dir", "opt/app"), ("dir", "opt/app/lib")]
    assert all(kind != "dir" for part in names[1:] for kind, _ in part)
    assert all(part and part[0][0] != "hardlink" for part in names)
    assert sum(len(p) for p in names) == len(members())


def test_the_directory_skeleton_is_one_chunk_whatever_it_weighs() -> None:
    """Thousands of directories weigh more than a chunk's target: still all in chunk 0,
    the only chunk a layout takes directories from."""
    dirs = [d(f"srv/d{i:04}") for i in range(300)]
    tar = tar_bytes([d("srv"), *dirs, *(f(f"srv/d{i:04}/x", b"x" * 3000) for i in range(0, 300, 10))])
    out = io.BytesIO()
    _, chunks = compress_tar(io.BytesIO(tar), out, level=3, target=16 << 10)
    parts = frames(out.getvalue(), chunks)
    assert len(parts) >= 3 and len(parts[0]) > 16 << 10
    kinds = []
    for i, part in enumerate(parts):
        reader = PaxReader(io.BytesIO(part), partial=i < len(parts) - 1)
        kinds.append([m.kind for m in reader if reader.read_all() is not None])
    assert kinds[0] == ["dir"] * 301
    assert all(kind == "file" for part in kinds[1:] for kind in part)


def test_a_small_archive_is_one_piece_without_a_table() -> None:
    tar = tar_bytes([f("a", "x")])
    out = io.BytesIO()
    raw, chunks = compress_tar(io.BytesIO(tar), out, level=3)
    assert (raw, chunks) == (len(tar), ())
    assert zstandard.ZstdDecompressor().decompressobj().decompress(out.getvalue()) == tar


def test_a_truncated_tar_is_an_error() -> None:
    tar = tar_bytes(members(5))
    with pytest.raises(ArchiveError, match="truncated"):
        compress_tar(io.BytesIO(tar[:1500]), io.BytesIO(), level=3)


def test_a_partial_reader_ends_at_a_boundary_but_not_inside_a_member() -> None:
    tar = tar_bytes([f("a", "x" * 700), f("b", "y")])
    cut = 512 + 1024  # header of a + its two data blocks
    assert [m.name for m in PaxReader(io.BytesIO(tar[:cut]), partial=True)] == ["a"]
    reader = PaxReader(io.BytesIO(tar[: cut + 512]), partial=True)
    with pytest.raises(ArchiveError, match="truncated"):
        for _ in reader:
            reader.read_all()


def test_a_large_chunk_pins_each_block_of_it_and_a_small_one_does_not() -> None:
    big = random.Random(3).randbytes(100_000)  # incompressible: one chunk of ~100 kB
    tar = tar_bytes([d("opt"), f("opt/small", "x" * 100), f("opt/big", big), f("opt/after", "y")])
    out = io.BytesIO()
    _, chunks = compress_tar(io.BytesIO(tar), out, level=3, target=16 << 10, block_size=8192, block_min=32768)
    blob = out.getvalue()
    large = [c for c in chunks if c.size > 32768]
    assert len(large) == 1 and all(not c.blocks and not c.block_size for c in chunks if c.size <= 32768)
    c = large[0]
    assert c.block_size == 8192 and len(c.blocks) == -(-c.size // 8192)
    for i, sha in enumerate(c.blocks):  # the last block is the rest of the chunk
        start = c.offset + i * 8192
        assert hashlib.sha256(blob[start : min(start + 8192, c.offset + c.size)]).hexdigest() == sha
