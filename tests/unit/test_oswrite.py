"""The OS streaming writer on sparse files, from a directory and from a faulty HTTP server."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bootenv import cli, ostarget, oswrite
from bootenv.blockdev import _mounted_devnos, check_fits, check_not_in_use, open_destination
from bootenv.blockmap import BlockMap, Range, data_extents, pack_image, parse_blockmap
from bootenv.errors import FatalError, RetryableError, UserError, VerificationError
from bootenv.httpreader import RetryPolicy
from bootenv.manifest import MANIFEST, Manifest, OsImage, RootFs, Source, parse_manifest
from bootenv.ostarget import HEADER, Target
from bootenv.oswrite import WriteResult, write_os
from bootenv.source import DirSource, HttpSource
from bootenv.store import BlobWriter, write_blob
from tests.unit.httpfault import Fault, FaultServer

MiB = 1 << 20
SIZE = 24 * MiB
FAST = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.002, timeout=5.0)


@dataclass(frozen=True)
class Built:
    dir: Path
    manifest: Manifest
    raw: bytes  # the whole OS image, holes included
    single_raw: bytes
    bmap: BlockMap


def _chunk(rng: random.Random, n: int) -> bytes:
    """Half random, half repetitive: compressed blocks and raw blocks both occur."""
    half = n // 2
    text = (b"bootenv %d " % rng.randrange(1000)) * (n // 8)
    return rng.randbytes(half) + text[: n - half]


def _sparse_image(path: Path, layout: list[tuple[int, bytes]], size: int) -> bytes:
    raw = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in layout:
            f.seek(off)
            f.write(data)
            raw[off : off + len(data)] = data
    return bytes(raw)


def _pack(out: Path, img: Path) -> tuple[OsImage, BlockMap]:
    with BlobWriter(out, "img.zst") as blob:
        bmap = pack_image(img, blob, block_size=4096)
        data = blob.finish(bmap.mapped)
    bmap_blob = write_blob(out, "bmap.json", bmap.to_json().encode())
    return OsImage(data, bmap_blob, ("base-files",), 3), bmap


def build_image(tmp: Path, seed: int = 1, *, big: bool = False) -> Built:
    rng = random.Random(seed)
    layout = [
        (0, rng.randbytes(8192)),  # boot sector and "superblock": held back
        (MiB - 4096, _chunk(rng, 16384)),  # straddles the held-back MiB
        # big: longer than a range (split in two) and than a write chunk
        (2 * MiB, _chunk(rng, 8 * MiB + 65536 if big else 1536 * 1024)),
        (13 * MiB, bytes(8192)),  # written zeros are data, not a hole
        (20 * MiB, _chunk(rng, 4096)),
        (SIZE - 4096, rng.randbytes(4096)),  # the very last block
    ]
    out = tmp / "image"
    out.mkdir()
    raw = _sparse_image(tmp / "os.img", layout, SIZE)
    os_image, bmap = _pack(out, tmp / "os.img")
    single_raw = _sparse_image(
        tmp / "single.img", [(0, rng.randbytes(4096)), (5 * MiB, _chunk(rng, MiB))], SIZE
    )
    single, _ = _pack(out, tmp / "single.img")
    manifest = Manifest(
        Source("gold", "Debian 12", "amd64", "6.1", "2024-01-01T00:00:00Z"),
        RootFs("ext4", SIZE, SIZE, 4096),
        os_image,
        (),
        single,
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return Built(out, manifest, raw, single_raw, bmap)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("osimg"))


@pytest.fixture(scope="module")
def built_big(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("osimg-big"), big=True)


@pytest.fixture(scope="module")
def server(built: Built) -> Iterator[FaultServer]:
    with FaultServer(built.dir) as srv:
        yield srv


@pytest.fixture
def srv(server: FaultServer) -> FaultServer:
    server.faults.clear()
    server.requests.clear()
    return server


def data_name(b: Built) -> str:
    return b.manifest.os.data.file


def write_to(path: Path, b: Built, source: object, **kw: object) -> WriteResult:
    with open_destination(str(path), SIZE) as dest:
        return write_os(source, b.manifest, dest.fd, progress=False, name=str(path), **kw)  # type: ignore[arg-type]


def merged(ranges: tuple[Range, ...]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for r in ranges:
        if out and out[-1][0] + out[-1][1] == r.offset:
            out[-1][1] += r.length
        else:
            out.append([r.offset, r.length])
    return [(o, n) for o, n in out]


def assert_image(path: Path, raw: bytes, bmap: BlockMap) -> None:
    data = path.read_bytes()
    assert len(data) == len(raw)
    # Compared as bytes, not through two sha256 of 24 MiB each (0.2 s a call here); the
    # message names the first byte that differs rather than diffing megabytes.
    if data != raw:
        first = next(i for i, (a, b) in enumerate(zip(data, raw, strict=True)) if a != b)
        pytest.fail(f"the written image differs from the source's from byte {first}")
    with open(path, "rb") as f:
        extents = list(data_extents(f.fileno(), len(raw)))
    assert extents == merged(bmap.ranges), "holes were written or data is missing"


OLD_HEADER = b"\x53\xef" * (HEADER // 2)


def old_disk(path: Path) -> Path:
    """A disk a previous install left. A failed write wipes its header once it has
    written anything; one that fails before its first write leaves the disk as it was."""
    path.write_bytes(OLD_HEADER)
    return path


def first_mib(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER)


def http(srv: FaultServer, policy: RetryPolicy = FAST) -> HttpSource:
    return HttpSource(srv.url, policy)


# --- from a directory -------------------------------------------------------------


def test_writes_data_and_keeps_holes(built_big: Built, tmp_path: Path) -> None:
    built = built_big
    out = tmp_path / "disk.img"
    result = write_to(out, built, DirSource(built.dir))
    assert_image(out, built.raw, built.bmap)
    assert result.bytes_written == built.bmap.mapped == built.manifest.os.data.raw_size
    assert result.compressed == built.manifest.os.data.size
    assert result.ranges == len(built.bmap.ranges) == 7
    assert result.image_size == SIZE


def test_big_image_over_http_with_drops(built_big: Built, tmp_path: Path) -> None:
    size = built_big.manifest.os.data.size
    with FaultServer(built_big.dir) as srv:
        srv.faults[built_big.manifest.os.data.file] = Fault(drops=[size // 5, size // 2, size - 3])
        write_to(tmp_path / "disk.img", built_big, http(srv))
    assert_image(tmp_path / "disk.img", built_big.raw, built_big.bmap)


def test_the_target_is_synced_as_it_is_written(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "disk.img"
    seen: list[tuple[str, str, int]] = []

    class Watched(oswrite.Flusher):
        def __init__(self, path: str, interval: float | None = None) -> None:
            seen.append(("open", os.path.realpath(path), out.stat().st_blocks))
            super().__init__(path, interval)
            assert self.running

        def close(self) -> None:
            seen.append(("close", str(out), out.stat().st_blocks))
            super().close()

    monkeypatch.setattr(oswrite, "Flusher", Watched)
    write_to(out, built, DirSource(built.dir))
    assert_image(out, built.raw, built.bmap)
    # Open on the target itself before any data is in; closed once the ranges are.
    assert [what for what, _, _ in seen] == ["open", "close"]
    assert seen[0][1] == seen[1][1] == str(out)
    assert seen[0][2] == 0 and seen[1][2] > 0


def test_single_image(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    assert built.manifest.single is not None
    result = write_to(out, built, DirSource(built.dir), which="single")
    bmap = parse_blockmap((built.dir / built.manifest.single.blockmap.file).read_bytes())
    assert_image(out, built.single_raw, bmap)
    assert result.which == "single"


def test_direct_io_path(built: Built, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        pytest.skip("the temp filesystem does not support O_DIRECT")
    os.close(fd)
    out = tmp_path / "disk.img"
    result = write_to(out, built, DirSource(built.dir), direct=True)
    assert result.direct
    assert_image(out, built.raw, built.bmap)


def test_a_regular_file_is_written_around_the_page_cache_where_it_can_be(
    built: Built, tmp_path: Path
) -> None:
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("the temp filesystem does not support O_DIRECT")
    out = tmp_path / "disk.img"
    result = write_to(out, built, DirSource(built.dir))  # no direct= given: the default
    assert result.direct
    assert_image(out, built.raw, built.bmap)


def test_a_file_system_without_o_direct_is_written_through_the_page_cache(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel refuses O_DIRECT with EINVAL where a filesystem lacks it (tmpfs before
    # Linux 6.6, some FUSE and network filesystems); this machine's all take it.
    real = fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, cmd, arg)

    monkeypatch.setattr(ostarget.fcntl, "fcntl", refuse)
    out = tmp_path / "disk.img"
    result = write_to(out, built, DirSource(built.dir))
    assert not result.direct
    assert_image(out, built.raw, built.bmap)


def test_a_target_that_refuses_direct_writes_is_written_through_the_page_cache(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some targets take O_DIRECT when it is set and refuse each direct write with EINVAL
    # (FUSE, a device whose logical block is larger than 4 KiB).
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "disk.img"
    result = write_to(out, built, DirSource(built.dir), direct=True)
    assert refused and not result.direct
    assert_image(out, built.raw, built.bmap)


def test_regular_file_is_created_sparse_and_grown(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    out.write_bytes(b"")
    write_to(out, built, DirSource(built.dir))
    assert out.stat().st_size == SIZE
    assert out.stat().st_blocks * 512 < SIZE  # still sparse


def test_destination_too_small_is_untouched(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "small.img"
    old = b"\x5a" * HEADER + bytes(MiB)
    out.write_bytes(old)
    with open(out, "r+b") as f, pytest.raises(UserError, match="too small"):
        write_os(DirSource(built.dir), built.manifest, f, progress=False)
    assert out.read_bytes() == old


def test_truncated_blob_on_disk(built: Built, tmp_path: Path) -> None:
    copy = _copy_image(built, tmp_path)
    blob = copy / data_name(built)
    blob.write_bytes(blob.read_bytes()[:-100])
    out = old_disk(tmp_path / "disk.img")
    with pytest.raises(VerificationError):
        write_to(out, built, DirSource(copy))
    assert first_mib(out) == bytes(HEADER)


def test_longer_blob_on_disk(built: Built, tmp_path: Path) -> None:
    copy = _copy_image(built, tmp_path)
    with open(copy / data_name(built), "ab") as f:
        f.write(b"extra")
    with pytest.raises(VerificationError, match="longer"):
        write_to(tmp_path / "disk.img", built, DirSource(copy))


def _copy_image(built: Built, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in built.dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def _repin(
    copy: Path, manifest: Manifest, *, data: bytes | None = None, bmap: bytes | None = None
) -> Manifest:
    """Replace the OS data or block map, pinning the new content (the capture was bad)."""
    os_image = manifest.os
    if data is not None:
        (copy / os_image.data.file).unlink()
        os_image = replace(
            os_image, data=replace(write_blob(copy, "img.zst", data), raw_size=os_image.data.raw_size)
        )
    if bmap is not None:
        (copy / os_image.blockmap.file).unlink()
        os_image = replace(os_image, blockmap=write_blob(copy, "bmap.json", bmap))
    new = replace(manifest, os=os_image)
    (copy / MANIFEST).write_text(new.to_json())
    return new


def test_bad_zstd_frame_is_fatal(built: Built, tmp_path: Path) -> None:
    copy = _copy_image(built, tmp_path)
    data = bytearray((copy / data_name(built)).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    data[0:4] = b"XXXX"  # not a zstd magic
    manifest = _repin(copy, built.manifest, data=bytes(data))
    out = old_disk(tmp_path / "disk.img")  # there before: kept, untouched (the first frame failed)
    with pytest.raises(VerificationError, match="zstd"), open_destination(str(out), SIZE) as dest:
        write_os(DirSource(copy), manifest, dest.fd, progress=False)
    assert first_mib(out) == OLD_HEADER
    fresh = tmp_path / "fresh.img"  # a file the write made: removed
    with pytest.raises(VerificationError, match="zstd"), open_destination(str(fresh), SIZE) as dest:
        write_os(DirSource(copy), manifest, dest.fd, progress=False)
    assert not fresh.exists()


def test_range_hash_mismatch_wipes_the_header(built: Built, tmp_path: Path) -> None:
    copy = _copy_image(built, tmp_path)
    bmap = built.bmap
    bad = replace(bmap, ranges=(*bmap.ranges[:-1], replace(bmap.ranges[-1], sha256="0" * 64)))
    manifest = _repin(copy, built.manifest, bmap=bad.to_json().encode())
    out = old_disk(tmp_path / "disk.img")
    old_os = b"\x53\xef" * (HEADER // 2)  # a previous install's header
    with open(out, "wb") as f:
        f.write(old_os)
    with open_destination(str(out), SIZE) as dest, pytest.raises(VerificationError, match="range at byte"):
        write_os(DirSource(copy), manifest, dest.fd, progress=False)
    assert first_mib(out) == bytes(HEADER)
    with open(out, "rb") as f:  # the ranges before the bad one did land
        f.seek(2 * MiB)
        assert f.read(MiB) == built.raw[2 * MiB : 3 * MiB]


def test_a_failing_disk_write_is_fatal_and_wipes_the_header(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write fails on the write-behind thread: the error reaches the caller, as the
    target's own one-line error, and the header is wiped as for any other failure."""
    real = Target._pwrite_all

    def failing(self: Target, buf: memoryview, offset: int) -> None:
        if offset >= 13 * MiB:
            raise FatalError(f"write at byte {offset} failed: Input/output error")
        real(self, buf, offset)

    monkeypatch.setattr(Target, "_pwrite_all", failing)
    out = old_disk(tmp_path / "disk.img")
    with open(out, "wb") as f:
        f.write(b"\x53\xef" * (HEADER // 2))  # a previous install's header
    with open_destination(str(out), SIZE) as dest, pytest.raises(FatalError, match="write at byte 13631488"):
        write_os(DirSource(built.dir), built.manifest, dest.fd, progress=False)
    assert first_mib(out) == bytes(HEADER)


def test_missing_single_is_a_user_error(built: Built, tmp_path: Path) -> None:
    manifest = replace(built.manifest, single=None)
    with open_destination(str(tmp_path / "d.img"), SIZE) as dest, pytest.raises(UserError, match="single"):
        write_os(DirSource(built.dir), manifest, dest.fd, which="single")


# --- over HTTP, with faults -------------------------------------------------------


def test_load_checked_reaches_the_data_blob_before_any_write(built: Built, srv: FaultServer) -> None:
    """What the agent checks before it wipes the disk: the block map, and one byte of
    the data blob (a Range request, so the blob is not fetched twice)."""
    assert oswrite.load_checked(http(srv), built.manifest) == built.bmap
    assert [(r.start, r.status) for r in srv.requests_for(data_name(built))] == [(0, 206)]
    srv.faults[data_name(built)] = Fault(errors=-1, status=404)
    with pytest.raises(UserError, match=r"\.img\.zst not found \(404\)"):
        oswrite.load_checked(http(srv), built.manifest)


def test_http_clean(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    result = write_to(out, built, http(srv))
    assert_image(out, built.raw, built.bmap)
    assert result.compressed == built.manifest.os.data.size
    assert [r.start for r in srv.requests_for(data_name(built))] == [0]


@pytest.mark.parametrize("seed", range(24))
def test_dropped_connection_resumes_at_the_exact_offset(
    built: Built, srv: FaultServer, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    size = built.manifest.os.data.size
    drops = sorted(rng.sample(range(1, size), rng.randint(1, 3)))
    if seed == 0:
        drops = [1, 2, size - 1]  # the edges
    srv.faults[data_name(built)] = Fault(drops=list(drops))
    out = tmp_path / "disk.img"
    write_to(out, built, http(srv))
    assert_image(out, built.raw, built.bmap)
    reqs = srv.requests_for(data_name(built))
    assert [r.start for r in reqs] == [0, *drops]
    assert [r.status for r in reqs] == [200] + [206] * len(drops)


def test_many_drops_each_making_progress_do_not_exhaust_retries(
    built: Built, srv: FaultServer, tmp_path: Path
) -> None:
    size = built.manifest.os.data.size
    drops = [size * i // 12 for i in range(1, 12)]  # 11 cuts, only 4 attempts allowed
    srv.faults[data_name(built)] = Fault(drops=drops)
    out = tmp_path / "disk.img"
    write_to(out, built, http(srv))
    assert_image(out, built.raw, built.bmap)


def test_server_ignoring_range_is_skipped_forward(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    size = built.manifest.os.data.size
    srv.faults[data_name(built)] = Fault(drops=[size // 3, size // 2], ignore_range=True)
    out = tmp_path / "disk.img"
    write_to(out, built, http(srv))
    assert_image(out, built.raw, built.bmap)
    assert [r.status for r in srv.requests_for(data_name(built))] == [200, 200, 200]


def test_stall_longer_than_timeout_resumes(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    at = built.manifest.os.data.size // 2
    srv.faults[data_name(built)] = Fault(stall_at=at, stall_seconds=1.5)
    out = tmp_path / "disk.img"
    write_to(out, built, http(srv, replace(FAST, timeout=0.3)))
    assert_image(out, built.raw, built.bmap)
    # urllib3 drops a partly read chunk on a timeout, so the resume may start earlier.
    starts = [r.start for r in srv.requests_for(data_name(built))]
    assert len(starts) >= 2 and starts == sorted(starts) and starts[1] <= at


def test_5xx_burst_then_success(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    srv.faults[data_name(built)] = Fault(errors=3, status=503)
    out = tmp_path / "disk.img"
    write_to(out, built, http(srv))
    assert_image(out, built.raw, built.bmap)
    assert [r.status for r in srv.requests_for(data_name(built))] == [503, 503, 503, 200]


def test_persistent_5xx_gives_up_after_bounded_attempts(
    built: Built, srv: FaultServer, tmp_path: Path
) -> None:
    srv.faults[data_name(built)] = Fault(errors=-1, status=502)
    out = tmp_path / "disk.img"
    out.write_bytes(b"old")
    with pytest.raises(RetryableError, match="after 4 attempts"):
        write_to(out, built, http(srv))
    assert len(srv.requests_for(data_name(built))) == FAST.attempts
    assert out.read_bytes()[:3] == b"old"  # nothing was written


def test_persistent_cut_gives_up_and_leaves_no_filesystem(
    built: Built, srv: FaultServer, tmp_path: Path
) -> None:
    cut = built.manifest.os.data.size - 10
    srv.faults[data_name(built)] = Fault(drop_always=cut)
    out = old_disk(tmp_path / "disk.img")
    with pytest.raises(RetryableError, match=f"at byte {cut}"):
        write_to(out, built, http(srv))
    assert first_mib(out) == bytes(HEADER)
    with open(out, "rb") as f:  # data past the first MiB landed, the header never did
        f.seek(MiB)
        assert f.read(12288) == built.raw[MiB : MiB + 12288]


@pytest.mark.parametrize("where", [0.0, 0.001, 0.3, 0.5, 0.9, 1.0])
def test_corrupt_byte_is_fatal_and_leaves_no_filesystem(
    built: Built, srv: FaultServer, tmp_path: Path, where: float
) -> None:
    size = built.manifest.os.data.size
    srv.faults[data_name(built)] = Fault(corrupt_at=min(int(size * where), size - 1))
    out = old_disk(tmp_path / "disk.img")
    with pytest.raises(VerificationError):
        write_to(out, built, http(srv))
    # A fault in the first range fails before any write (the header's ranges are held
    # back until all is verified): the old disk is as it was. Later, the header is wiped.
    assert first_mib(out) == (OLD_HEADER if where < 0.01 else bytes(HEADER))


def test_truncated_file_on_server_is_fatal(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    srv.faults[data_name(built)] = Fault(truncate=built.manifest.os.data.size // 2)
    out = old_disk(tmp_path / "disk.img")
    with pytest.raises(VerificationError, match="manifest says"):
        write_to(out, built, http(srv))
    assert first_mib(out) == OLD_HEADER  # refused on the answer's length, before any write
    assert len(srv.requests_for(data_name(built))) == 1  # fatal: no retry


def test_truncated_after_resume_is_fatal(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    size = built.manifest.os.data.size
    # The connection drops, and by the time we resume the file has shrunk below our offset.
    srv.faults[data_name(built)] = Fault(drops=[size // 2])
    out = tmp_path / "disk.img"
    source = http(srv)
    reader = source.open(data_name(built), size)
    first = reader.read(size)  # up to the cut
    assert len(first) == size // 2
    srv.faults[data_name(built)] = Fault(truncate=size // 4)
    with pytest.raises(VerificationError, match="shorter"):
        reader.read(1 << 20)
    assert not out.exists()


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_content_length_lie_is_fatal_before_writing(
    built: Built, srv: FaultServer, tmp_path: Path, delta: int
) -> None:
    srv.faults[data_name(built)] = Fault(length_delta=delta)
    out = tmp_path / "disk.img"
    out.write_bytes(b"old")
    with pytest.raises(VerificationError, match="the manifest says"):
        write_to(out, built, http(srv))
    assert out.read_bytes()[:3] == b"old"


def test_a_body_longer_than_the_manifest_without_a_length_is_refused(
    built: Built, srv: FaultServer, tmp_path: Path
) -> None:
    """With no Content-Length, only reading past the manifest's size tells: it is done,
    once, at the end of the blob."""
    srv.faults[data_name(built)] = Fault(trailing=7000)
    with pytest.raises(VerificationError, match="longer than the manifest says"):
        write_to(tmp_path / "disk.img", built, http(srv))
    srv.faults[data_name(built)] = Fault(trailing=0)
    write_to(tmp_path / "disk.img", built, http(srv))  # the same server, honest: it passes


def test_tampered_block_map_is_refused(built: Built, srv: FaultServer, tmp_path: Path) -> None:
    srv.faults[built.manifest.os.blockmap.file] = Fault(corrupt_at=20)
    with pytest.raises(VerificationError, match="sha256"):
        write_to(tmp_path / "disk.img", built, http(srv))
    assert srv.requests_for(data_name(built)) == []


# --- the command line and the block-device checks ---------------------------------


def test_cli_write_os_json(
    built: Built, srv: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disk.img"
    assert cli.main(["write-os", "--insecure", "--image", srv.url, "--device", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bytes_written"] == built.bmap.mapped and doc["image_size"] == SIZE
    assert_image(out, built.raw, built.bmap)


def test_cli_write_os_summary_and_single(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disk.img"
    assert (
        cli.main(["write-os", "--insecure", "--image", str(built.dir), "--device", str(out), "--single"]) == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote ") and "24.0 MiB image" in line and "\n" not in line
    # --single wrote the one-piece image, not the OS sub-image (the two differ).
    assert built.manifest.single is not None and built.single_raw != built.raw
    bmap = parse_blockmap((built.dir / built.manifest.single.blockmap.file).read_bytes())
    assert_image(out, built.single_raw, bmap)


def test_cli_failure_is_one_line(
    built: Built, srv: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv.faults[data_name(built)] = Fault(corrupt_at=1000)
    rc = cli.main(["write-os", "--insecure", "--image", srv.url, "--device", str(tmp_path / "d.img")])
    err = capsys.readouterr().err
    assert rc == VerificationError.exit_code
    lines = [ln for ln in err.splitlines() if ln.startswith("bootenv:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert not (tmp_path / "d.img").exists()  # made by the failed write: removed


def test_parse_mountinfo() -> None:
    info = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 7:3 / /mnt/x rw - ext4 /dev/loop3 rw\n"
        "41 22 0:5 / /dev rw - devtmpfs udev rw\n"
    )
    mounts = _mounted_devnos(info)
    assert mounts[os.makedev(7, 3)] == "/mnt/x"
    assert mounts[os.makedev(254, 0)] == "/"


def test_mounted_device_is_refused() -> None:
    dev = os.makedev(250, 77)  # no such device in sysfs: only the mount table matters
    info = "40 22 250:77 / /srv/data rw - ext4 /dev/fake rw\n"
    with pytest.raises(UserError, match="mounted at /srv/data"):
        check_not_in_use("/dev/fake", dev, info)
    check_not_in_use("/dev/fake", os.makedev(250, 78), info)


def test_running_root_is_refused() -> None:
    root = os.stat("/").st_dev
    if not os.major(root):
        pytest.skip("the root filesystem is not on a block device here")
    with pytest.raises(UserError, match=r"^/dev/root holds the running system's root filesystem$"):
        check_not_in_use("/dev/root", root, "")


def test_check_fits() -> None:
    check_fits("/dev/x", 100, 100)
    with pytest.raises(UserError, match="too small"):
        check_fits("/dev/x", 99, 100)


def test_manifest_roundtrip_of_helper(built: Built) -> None:
    assert parse_manifest((built.dir / MANIFEST).read_text()) == built.manifest


def test_cli_refuses_unsigned_and_untrusted_images(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootenv.signing import keygen

    out = tmp_path / "disk.img"
    assert cli.main(["write-os", "--image", str(built.dir), "--device", str(out)]) == 4
    assert "not signed" in capsys.readouterr().err
    assert not out.exists()  # refused before the destination was even created
    key, other = tmp_path / "k", tmp_path / "other"
    keygen(key)
    keygen(other)
    assert cli.main(["sign", str(built.dir), "--key", str(key)]) == 0
    rc = cli.main(["write-os", "--image", str(built.dir), "--device", str(out), "--trust", f"{other}.pub"])
    assert rc == 4 and "untrusted key" in capsys.readouterr().err
    assert not out.exists()
    assert (
        cli.main(["write-os", "--image", str(built.dir), "--device", str(out), "--trust", f"{key}.pub"]) == 0
    )
    assert_image(out, built.raw, built.bmap)


@pytest.mark.parametrize("behind", [False, True])
def test_the_compressed_streams_hash_checks_on_its_thread_too(behind: bool) -> None:
    """The sha256 of the stream may run on a thread of its own: the same verdicts, and
    the thread is gone once the reader is verified or closed."""
    import io
    import threading

    from bootenv.manifest import Blob
    from bootenv.osstream import HashingReader

    data = random.Random(5).randbytes(5 * 1024 * 1024 + 17)
    blob = Blob(file="x", sha256=hashlib.sha256(data).hexdigest(), size=len(data), raw_size=len(data))
    good = HashingReader(io.BytesIO(data), blob, "x", behind=behind)
    got = b"".join(iter(lambda: good.read(1 << 20), b""))
    good.verify()
    assert got == data
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    bad = HashingReader(io.BytesIO(bytes(flipped)), blob, "x", behind=behind)
    while bad.read(1 << 20):
        pass
    with pytest.raises(VerificationError, match="does not match its sha256"):
        bad.verify()
    abandoned = HashingReader(io.BytesIO(data), blob, "x", behind=behind)
    abandoned.read(1 << 20)
    abandoned.close()
    abandoned.close()
    assert not [t for t in threading.enumerate() if t.name == "hash"]


# --- the order the filesystem becomes visible in ------------------------------------


def test_superblock_last_splits_the_first_4_kib_off_and_keeps_every_byte() -> None:
    pieces = [(0, 274432), (278528, 20480)]
    rest, first = oswrite.superblock_last(pieces)
    assert first == [(0, 4096)]
    assert rest == [(4096, 270336), (278528, 20480)]
    # A 1 KiB-block image's first pieces, each under 4 KiB: all of them go last.
    assert oswrite.superblock_last([(1024, 1024), (2048, 2048), (8192, 1024)]) == (
        [(8192, 1024)],
        [(1024, 1024), (2048, 2048)],
    )
    for pieces in ([(0, 4096)], [(0, 1 << 20)], [(1024, 3072), (4096, 512)], [(2048, 8192)]):
        rest, first = oswrite.superblock_last(pieces)
        covered = sorted(rest + first)
        assert sum(n for _, n in covered) == sum(n for _, n in pieces)
        assert all(o + n <= 4096 for o, n in first) and all(o >= 4096 for o, _ in rest)


def test_the_superblock_is_written_last_after_a_sync(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between the held-back pieces must not leave a new superblock over old
    metadata (blkid would call it the image's filesystem): the first 4 KiB go last, alone,
    after everything else is synced."""
    events: list[tuple[str, int, int]] = []
    real_write, real_sync = Target.write, Target.sync

    def write(self: Target, buf: memoryview, offset: int) -> None:
        events.append(("write", offset, len(buf)))
        real_write(self, buf, offset)

    def sync(self: Target) -> None:
        events.append(("sync", 0, 0))
        real_sync(self)

    monkeypatch.setattr(Target, "write", write)
    monkeypatch.setattr(Target, "sync", sync)
    out = tmp_path / "disk.img"
    write_to(out, built, DirSource(built.dir))
    assert_image(out, built.raw, built.bmap)
    writes = [i for i, e in enumerate(events) if e[0] == "write"]
    low = [i for i in writes if events[i][1] < 4096]
    assert low and low == writes[-len(low) :]  # the first 4 KiB: the last writes of all
    assert all(events[i][1] + events[i][2] <= 4096 for i in low)
    assert events[low[0] - 1][0] == "sync" and events[-1][0] == "sync"


def test_a_block_map_without_a_superblock_is_refused_before_any_write(built: Built, tmp_path: Path) -> None:
    bmap = built.bmap
    for ranges in ((), tuple(r for r in bmap.ranges if not r.offset <= 1024 < r.offset + r.length)):
        bad = replace(bmap, ranges=ranges)
        out = tmp_path / "disk.img"
        out.write_bytes(b"old filesystem")
        with pytest.raises(VerificationError, match=r"maps no superblock \(byte 1024\)"):
            oswrite._check_blockmap(built.manifest, "os", bad)
        with (
            open_destination(str(out), SIZE) as dest,
            pytest.raises(VerificationError, match="no superblock"),
        ):
            write_os(DirSource(built.dir), built.manifest, dest.fd, progress=False, name=str(out), bmap=bad)
        assert out.read_bytes()[:14] == b"old filesystem"


def test_a_missing_or_regular_path_under_dev_is_refused_not_created(tmp_path: Path) -> None:
    name = f"bootenv-test-{os.getpid()}-sdz3"
    want = r"does not exist: a path under /dev must be a block device"
    with pytest.raises(UserError, match=want), open_destination(f"/dev/{name}", SIZE):
        pass
    assert not os.path.lexists(f"/dev/{name}")
    (tmp_path / "devlink").symlink_to("/dev")  # the same directory, through a link
    with (
        pytest.raises(UserError, match="does not exist"),
        open_destination(str(tmp_path / "devlink" / name), SIZE),
    ):
        pass
    assert not os.path.lexists(f"/dev/{name}")
