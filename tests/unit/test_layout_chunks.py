"""Chunked components: every piece on any stream, verified alone, the same tree as one piece."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bootenv import fetchahead as fetchahead_mod
from bootenv import stream as stream_mod
from bootenv.arriving import Arriving
from bootenv.journal import Journal
from bootenv.manifest import Blob, Chunk, Component, Manifest, OsImage, RootFs, Source, parse_manifest
from bootenv.paxread import PaxReader
from bootenv.prefetch import Prefetch
from tests.faults.helpers import component, run_layout
from tests.hostile.kit import MTIME, Comp, RefusingWriter, blob, d, f, hard, make_image, snapshot, tar_bytes
from tests.unit.httpfault import Fault, FaultServer

COUNTS: list[int] = []  # files placed and merged, laid out whole
CHUNK = 24 << 10  # the big components' chunks: a few small files, or a big file pinned by blocks
SMALL_CHUNK = 12 << 10  # a few files per chunk: twenty chunks for each small component


def comps() -> list[Comp]:
    return [component("good", 7, files=40), component("bad", 8, files=40)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, tuple[object, ...]]]:
    base = tmp_path_factory.mktemp("chunks")
    whole = make_image(base / "whole", comps())
    chunked = make_image(base / "chunked", comps(), chunk=SMALL_CHUNK)
    res, _ = run_layout(str(whole), base / "ref")
    assert res.ok
    COUNTS[:] = [sum(c.files for c in res.components), sum(len(c.merged) for c in res.components)]
    return whole, chunked, snapshot(base / "ref")


def manifest(image: Path) -> Manifest:
    return parse_manifest((image / "manifest.json").read_text())


@pytest.mark.parametrize("streams", [1, 3])
def test_chunked_layout_is_the_tree_of_the_whole_archive(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path, streams: int
) -> None:
    _, chunked, ref = images
    m = manifest(chunked)
    assert all(len(c.chunks) >= 8 for c in m.components)
    res, act = run_layout(str(chunked), tmp_path / "root", streams=streams)
    assert res.ok, [c.error for c in res.components]
    assert snapshot(tmp_path / "root") == ref
    # As many as in one piece (which component placed the shared config first may vary).
    assert sum(c.files for c in res.components) == COUNTS[0]
    assert sum(len(c.merged) for c in res.components) == COUNTS[1]
    # Directory mtimes are restored once every piece is in, not after the first.
    assert (tmp_path / "root/opt/good/sub").stat().st_mtime == MTIME
    assert (tmp_path / "root/opt/bad").stat().st_mtime == MTIME
    assert act.calls and not list((tmp_path / "root").rglob(".bootenv~*"))
    for c in m.components:
        assert Journal(tmp_path / "root").reached(c.name, c.data.sha256, "done")


def test_streams_fetch_each_chunk_with_a_range_request(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    _, chunked, ref = images
    m = manifest(chunked)
    with FaultServer(chunked) as srv:
        res, _ = run_layout(srv.url, tmp_path / "root", streams=3)
    assert res.ok, [c.error for c in res.components]
    assert snapshot(tmp_path / "root") == ref
    for c in m.components:
        got = sorted((r.start, r.status) for r in srv.requests_for(c.data.file))
        assert got == [(k.offset, 206) for k in c.chunks]


def test_a_cut_inside_a_chunk_resumes_inside_that_chunk(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path
) -> None:
    _, chunked, ref = images
    comp = manifest(chunked).component("good")
    k = comp.chunks[3]
    cut = k.offset + k.size // 2
    with FaultServer(chunked) as srv:
        srv.faults[comp.data.file] = Fault(drops=[cut])
        res, _ = run_layout(srv.url, tmp_path / "root", streams=2)
    assert res.ok, [c.error for c in res.components]
    assert snapshot(tmp_path / "root") == ref
    assert (cut, 206) in [(r.start, r.status) for r in srv.requests_for(comp.data.file)]


@pytest.mark.parametrize("length", [True, False])
def test_a_server_that_ignores_ranges_still_gives_the_right_bytes(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]], tmp_path: Path, length: bool
) -> None:
    """Its whole file goes on past each chunk by design: with a length or without one
    (then a chunk's reader must not read on to look for the body's end)."""
    _, chunked, ref = images
    with FaultServer(chunked) as srv:
        for c in manifest(chunked).components:
            srv.faults[c.data.file] = Fault(ignore_range=True, trailing=0 if length else 1)
        res, _ = run_layout(srv.url, tmp_path / "root", streams=2)
    assert res.ok, [c.error for c in res.components]
    assert snapshot(tmp_path / "root") == ref


@pytest.mark.parametrize("held", ["memory", "disk"])
@pytest.mark.parametrize("streams", [1, 3])
def test_a_corrupt_chunk_fails_its_component_only(
    images: tuple[Path, Path, dict[str, tuple[object, ...]]],
    tmp_path: Path,
    streams: int,
    held: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if held == "disk":  # every chunk is "large": it waits in an unnamed file on the target

        def no_memory(name: str) -> int:
            raise AssertionError(f"{name} was held in memory")

        monkeypatch.setattr(fetchahead_mod, "IN_MEMORY", 0)
        monkeypatch.setattr(os, "memfd_create", no_memory)
    _, chunked, _ = images
    comp = manifest(chunked).component("bad")
    k = comp.chunks[len(comp.chunks) // 2]
    with FaultServer(chunked) as srv:
        srv.faults[comp.data.file] = Fault(corrupt_at=k.offset + k.size // 2)
        res, act = run_layout(srv.url, tmp_path / "root", streams=streams)
    by = {c.name: c for c in res.components}
    assert by["good"].status == "done" and by["bad"].status == "failed"
    assert by["bad"].error and ("sha256" in by["bad"].error or "corrupt" in by["bad"].error)
    assert act.calls == [(tmp_path / "root", ["good.service"])]
    journal = Journal(tmp_path / "root")
    assert journal.phase("bad", comp.data.sha256) is None
    # The chunk was checked before any of its files was placed: none of them is there.
    blob_bytes = (chunked / comp.data.file).read_bytes()[k.offset : k.offset + k.size]
    reader = PaxReader(
        io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(blob_bytes)), partial=True
    )
    names = []
    for m in reader:
        names.append(m.name)
        reader.read_all()
    assert names and not [n for n in names if os.path.lexists(tmp_path / "root" / n)]
    assert journal.reached("good", manifest(chunked).component("good").data.sha256, "done")


def _members(members: list[tarfile.TarInfo], *, last: bool) -> bytes:
    out = b""
    for ti in members:
        data = getattr(ti, "data", b"") or b""
        out += ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % 512)
    return out + (bytes(1024) if last else b"")


def hand_chunked(directory: Path, parts: list[list[tarfile.TarInfo]]) -> Path:
    """An image whose one component has exactly these chunks (not as capture would cut)."""
    directory.mkdir()
    frames = [_members(p, last=i == len(parts) - 1) for i, p in enumerate(parts)]
    packed = [zstandard.ZstdCompressor().compress(fr) for fr in frames]
    chunks, offset = [], 0
    for fr, z in zip(frames, packed, strict=True):
        chunks.append(Chunk(offset, len(z), len(fr), hashlib.sha256(z).hexdigest()))
        offset += len(z)
    data = blob(directory, b"".join(packed), "tar.zst", sum(len(fr) for fr in frames))
    comp = Component("x", data, ("x",), (), 3, (), tuple(chunks))
    m = Manifest(
        Source("gold", "Debian", "amd64", "6.1", "2024-01-01T00:00:00Z"),
        RootFs("ext4", 1 << 20, 1 << 20, 4096),
        OsImage(blob(directory, b"os", "img.zst", 2), blob(directory, b"{}", "bmap.json", 2), (), 1),
        (comp,),
    )
    (directory / "manifest.json").write_text(m.to_json())
    assert json.loads(m.to_json())["components"][0]["chunks"]
    return directory


@pytest.mark.parametrize(
    ("parts", "refusal"),
    [
        ([[d("a")], [f("a/x", "1"), d("b")], [f("b/y", "2")]], "outside the archive's first chunk"),
        ([[d("a")], [f("a/x", "1")], [hard("a/z", "./a/x")]], "outside this archive"),
    ],
    ids=["directory-in-a-later-chunk", "hardlink-across-chunks"],
)
def test_chunks_capture_would_not_make_are_refused(
    tmp_path: Path, parts: list[list[tarfile.TarInfo]], refusal: str
) -> None:
    image = hand_chunked(tmp_path / "img", parts)
    res, act = run_layout(str(image), tmp_path / "root")
    assert res.components[0].status == "failed"
    assert refusal in (res.components[0].error or "")
    assert act.calls == []


def test_a_hand_cut_archive_that_follows_the_rules_lays_out(tmp_path: Path) -> None:
    parts = [
        [d("a"), d("a/b", mode=0o700)],
        [f("a/x", "1"), hard("a/y", "./a/x")],
        [f("a/b/z", io.BytesIO(b"2").read())],
    ]
    image = hand_chunked(tmp_path / "img", parts)
    res, _ = run_layout(str(image), tmp_path / "root", streams=3)
    assert res.ok, [c.error for c in res.components]
    root = tmp_path / "root"
    assert (root / "a/x").stat().st_ino == (root / "a/y").stat().st_ino
    assert (root / "a/b/z").read_bytes() == b"2" and (root / "a/b").stat().st_mode & 0o777 == 0o700


# --- large pieces, checked block by block as they arrive -----------------------------


def big_comps() -> list[Comp]:
    """Two components; each holds files too large for one chunk (pinned block by block)."""
    out = []
    for name, seed in (("good", 11), ("bad", 12)):
        rng = random.Random(seed)
        c = component(name, seed, files=20)
        for i in range(3):
            c.members.append(f(f"opt/{name}/big{i}", rng.randbytes(120_000 + 1000 * i), mode=0o640))
        out.append(c)
    return out


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[object, ...]]]:
    base = tmp_path_factory.mktemp("blocks")
    whole = make_image(base / "whole", big_comps())
    res, _ = run_layout(str(whole), base / "ref")
    assert res.ok
    return make_image(base / "blocks", big_comps(), chunk=CHUNK, blocks=8192), snapshot(base / "ref")


@pytest.mark.parametrize("streams", [1, 3])
def test_pieces_laid_out_as_they_arrive_make_the_same_tree(
    big_images: tuple[Path, dict[str, tuple[object, ...]]],
    tmp_path: Path,
    streams: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, ref = big_images
    monkeypatch.setattr(fetchahead_mod, "READ", 4096)  # the blocks come in one by one
    assert sum(1 for c in manifest(image).components for k in c.chunks if k.blocks) == 6
    with FaultServer(image) as srv:
        res, _ = run_layout(srv.url, tmp_path / "root", streams=streams)
    assert res.ok, [c.error for c in res.components]
    assert snapshot(tmp_path / "root") == ref
    assert not list((tmp_path / "root").rglob(".bootenv~*"))


def _names_in(image: Path, comp: Component, chunk: Chunk) -> list[str]:
    data = (image / comp.data.file).read_bytes()[chunk.offset : chunk.offset + chunk.size]
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    reader = PaxReader(io.BytesIO(tar), partial=True)
    names = []
    for m in reader:
        names.append(m.name)
        reader.read_all()
    return names


def test_a_bad_block_fails_its_component_and_no_byte_of_it_reaches_a_file(
    big_images: tuple[Path, dict[str, tuple[object, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, ref = big_images
    monkeypatch.setattr(fetchahead_mod, "READ", 4096)  # the stream reads the blocks as they come
    bad = manifest(image).component("bad")
    k = next(c for c in bad.chunks if c.blocks)
    inside = [n for n in _names_in(image, bad, k) if n.startswith("opt/bad/big")]
    assert len(inside) == 1
    with FaultServer(image) as srv:
        srv.faults[bad.data.file] = Fault(corrupt_at=k.offset + 3 * 8192 + 5)
        res, _ = run_layout(srv.url, tmp_path / "root", streams=2)
    by = {c.name: c for c in res.components}
    assert by["good"].status == "done" and by["bad"].status == "failed"
    assert "block 3 of a chunk" in (by["bad"].error or "")
    got = snapshot(tmp_path / "root")
    # Whatever of "bad" is in the tree is exactly what the good image has (files from
    # the blocks before the bad one may be); its big file, whose bytes the bad block
    # holds, is not there at all.
    for path, entry in got.items():
        if path.startswith("opt/bad/"):
            assert ref.get(path) == entry, path
    assert inside[0] in ref and inside[0] not in got
    assert not list((tmp_path / "root").rglob(".bootenv~*"))


def test_a_stream_that_fails_while_its_piece_arrives_reports_its_own_error(
    big_images: tuple[Path, dict[str, tuple[object, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the fetch's "cancelled", which its release causes; and the run does not wait
    for the download it no longer needs."""
    image, _ = big_images
    monkeypatch.setattr(fetchahead_mod, "READ", 4096)
    bad = manifest(image).component("bad")
    k = next(c for c in bad.chunks if c.blocks)
    real = Arriving.read

    def read(self: Arriving, n: int = -1, /) -> bytes:
        if self._name == f"bad piece {bad.chunks.index(k)}":
            raise OSError(errno.ENOSPC, "No space left on device")  # say, writing its file
        return real(self, n)

    monkeypatch.setattr(Arriving, "read", read)
    with FaultServer(image) as srv:
        # The piece's download is held up halfway, for far longer than the layout takes.
        srv.faults[bad.data.file] = Fault(stall_at=k.offset + k.size // 2, stall_seconds=20)
        res, _ = run_layout(srv.url, tmp_path / "root", streams=1)
        assert srv.stalled.is_set() and not srv.resumed.is_set(), (
            "it waited for the download its stream no longer needed"
        )
    by = {c.name: c for c in res.components}
    assert by["good"].status == "done" and by["bad"].status == "failed"
    assert "No space left on device" in (by["bad"].error or ""), by["bad"].error


def test_a_failing_stream_stops_its_read_ahead_waiting_on_an_arriving_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-ahead thread waits for bytes that have not arrived yet; a stream that
    fails meanwhile does not wait for it (Prefetch.close would give it 5 s)."""
    tar = tar_bytes([f("opt/a", random.Random(4).randbytes(3 << 20)), f("opt/b", "b")])
    blob = zstandard.ZstdCompressor(level=1).compress(tar)
    piece = tmp_path / "piece"
    piece.write_bytes(blob[: 1200 << 10])  # a MiB and a bit is in: the first read-ahead block
    sha = hashlib.sha256(blob).hexdigest()
    comp = Component("c", Blob(f"{sha}.tar.zst", sha, len(blob), len(tar)), (), (), 2, (), ())
    made: list[Prefetch] = []

    class Recorded(Prefetch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(stream_mod, "Prefetch", Recorded)
    with open(piece, "rb") as fh:
        src = Arriving(fh, len(blob), "c piece 0", str(piece))
        with pytest.raises(OSError, match="No space left"):
            stream_mod._lay_out(comp, 0, src, RefusingWriter(), partial=False, stop=src.stop)  # type: ignore[arg-type]
        # Its close() joined the thread: without the stop it would have waited its
        # JOIN_TIMEOUT and left the thread waiting on the file.
        assert len(made) == 1 and made[0].ended


@pytest.mark.parametrize("streams", [1, 2])
def test_a_piece_whose_blocks_match_but_whole_sha256_does_not_fails_its_component(
    big_images: tuple[Path, dict[str, tuple[object, ...]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    streams: int,
) -> None:
    """A manifest whose block hashes and whole sha256 disagree (a broken capture): every
    byte read matched its block, and the stream may be done before the fetch's last
    check fails; that failure still fails the component, it is not lost."""
    image, _ = big_images
    monkeypatch.setattr(fetchahead_mod, "READ", 4096)
    doc = json.loads((image / "manifest.json").read_text())
    bad = next(c for c in doc["components"] if c["name"] == "bad")
    pinned = next(c for c in bad["chunks"] if c.get("blocks"))
    pinned["sha256"] = "0" * 64
    broken = tmp_path / "image"
    broken.mkdir()
    for p in image.iterdir():
        (broken / p.name).symlink_to(p)
    (broken / "manifest.json").unlink()
    (broken / "manifest.json").write_text(json.dumps(doc))
    half = pinned["offset"] + pinned["size"] // 2
    with FaultServer(broken) as srv:
        # Held up halfway: its stream starts on it before it is all in, and ends after.
        srv.faults[bad["data"]["file"]] = Fault(stall_at=half, stall_seconds=0.5)
        res, _ = run_layout(srv.url, tmp_path / "root", streams=streams)
    by = {c.name: c for c in res.components}
    assert by["good"].status == "done"
    assert by["bad"].status == "failed"
    assert "does not match its sha256" in (by["bad"].error or ""), by["bad"].error
    assert "block" not in (by["bad"].error or ""), "the whole piece's check, not a block's"
    assert not Journal(tmp_path / "root").reached(
        "bad", manifest(image).component("bad").data.sha256, "files"
    )
