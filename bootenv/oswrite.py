"""Stream an OS sub-image onto a disk, a partition or a regular file.

The chain is source (HTTP with Range resume, or a file) → sha256 of the compressed
stream → zstd → per-range sha256 → pwrite at the range's offset. Holes of the block map
are never written. Three threads share the work, as the three processes of
`curl | zstd -dc | dd` do: fetch and decompress (prefetch.py), hash (the caller), write
(writebehind.py). Memory stays flat: three 4 MiB buffers and the held-back header.

Fail safe, after coreos-installer: the first MiB of the image (the ext4 superblock is at
byte 1024) is held back in memory and written only once every range and the whole
compressed stream have verified. The first write of all wipes that MiB on the target,
so an interrupted write, even a power cut, never leaves a mountable filesystem, and
any failure after the first write wipes it again before the error propagates.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

import zstandard

from bootenv.blockdev import device_size, is_block, open_destination
from bootenv.blockmap import BlockMap, Range, parse_blockmap
from bootenv.errors import BootenvError, FatalError, UserError, VerificationError
from bootenv.log import Progress, human_bytes, step
from bootenv.manifest import Blob, Manifest, OsImage, parse_manifest
from bootenv.prefetch import Prefetch
from bootenv.signing import Trust
from bootenv.source import Source, open_source, read_manifest
from bootenv.trusted import open_trusted
from bootenv.writeback import Flusher, start_writeback
from bootenv.writebehind import WriteBehind

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # decompressed bytes per buffer
BUFFERS = 3  # one being filled and hashed, one being written, one spare
READ = 1 << 20  # compressed bytes per network read
HASH_QUEUE = 4  # network reads waiting for the compressed stream's sha256 (4 MiB)
HEADER = 1 << 20  # held back until everything verified
SUPERBLOCK = 1024  # ext4's primary superblock's offset, whatever the block size
VISIBLE = 4096  # the first bytes, which hold it: written last of all
ALIGN = 4096  # O_DIRECT offset/length alignment (covers 512- and 4096-byte sectors)

Which = Literal["os", "single"]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


@dataclass(frozen=True)
class WriteResult:
    device: str
    which: str
    bytes_written: int  # data bytes of the image written (the block map's ranges)
    image_size: int
    ranges: int
    compressed: int  # bytes read from the source
    seconds: float
    direct: bool  # O_DIRECT was used for the bulk of the data

    @property
    def throughput(self) -> float:
        """Data bytes written per second (holes cost nothing, so they do not count)."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"wrote {human_bytes(self.bytes_written)} of a {human_bytes(self.image_size)} image "
            f"to {self.device} ({self.ranges} ranges, {human_bytes(self.compressed)} read) "
            f"in {self.seconds:.1f} s, {human_bytes(self.throughput)}/s"
        )


class HashingReader:
    """Reads exactly `blob.size` bytes, hashing them; `verify()` checks size and sha256.

    With `behind`, the hashing runs on a thread of its own (sha256 releases the GIL):
    the reads come from the thread that decompresses, which was write-os's busiest
    (py-spy on LAMP's OS: socket reads, this sha256 and zstd took 90% of its samples,
    the sha256 a quarter of them). At most HASH_QUEUE reads wait to be hashed."""

    def __init__(self, raw: BinaryIO, blob: Blob, name: str, *, behind: bool = False) -> None:
        self.raw = raw
        self.blob = blob
        self.name = name
        self.count = 0
        self._hash = hashlib.sha256()
        self._todo: queue.Queue[bytes | None] | None = None
        self._hasher: threading.Thread | None = None
        if behind:
            self._todo = queue.Queue(maxsize=HASH_QUEUE)
            self._hasher = threading.Thread(target=self._hash_behind, name="hash", daemon=True)
            self._hasher.start()

    def _hash_behind(self) -> None:
        assert self._todo is not None
        while (data := self._todo.get()) is not None:
            self._hash.update(data)

    def read(self, n: int = -1) -> bytes:
        left = self.blob.size - self.count
        if n < 0 or n > left:
            n = left
        data = self.raw.read(n) if n else b""
        if self._todo is not None:
            self._todo.put(data)
        else:
            self._hash.update(data)
        self.count += len(data)
        return data

    def close(self) -> None:
        """Stop the hashing thread (once it has hashed what it was given)."""
        if self._todo is not None and self._hasher is not None:
            self._todo.put(None)
            self._hasher.join()
        self._todo = self._hasher = None

    def verify(self) -> None:
        while self.read(READ):  # whatever zstd left unread (there should be nothing)
            pass
        self.close()
        if self.count != self.blob.size:
            raise VerificationError(f"{self.name} is truncated: {self.count} of {self.blob.size} bytes")
        if self.raw.read(1):
            raise VerificationError(f"{self.name} is longer than the manifest says ({self.blob.size} bytes)")
        if self._hash.hexdigest() != self.blob.sha256:
            raise VerificationError(f"{self.name} does not match its sha256 in the manifest")


class Target:
    """pwrite()s to an fd, with O_DIRECT for aligned writes when asked to.

    The first write wipes the header region (and, on a block device, the last MiB past
    the image, where GPT backups and md/LVM metadata live); `wipe()` makes the target
    unmountable.
    """

    def __init__(self, fd: int, *, direct: bool, is_block: bool, image_size: int) -> None:
        self.fd = fd
        self.direct = direct
        self.is_block = is_block
        self.image_size = image_size
        self.touched = False
        self.written = 0
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._direct_on = False

    def _set_direct(self, on: bool) -> None:
        if on != self._direct_on:
            flags = self._flags | os.O_DIRECT if on else self._flags
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
            except OSError as exc:
                if on:  # a filesystem without O_DIRECT (tmpfs before Linux 6.6, some FUSE)
                    raise _DirectRefusedError from exc
                raise
            self._direct_on = on

    def write(self, buf: memoryview, offset: int) -> None:
        if not self.touched:
            self.touched = True
            self.wipe(sync=False)
            if self.is_block:
                self._wipe_tail()
            # The old superblock must be gone from the disk itself before new data lands,
            # or a power cut could leave the old filesystem over a half-new one.
            self.sync()
        aligned = len(buf) - len(buf) % ALIGN if self.direct and offset % ALIGN == 0 else 0
        if aligned:
            try:
                self._set_direct(True)
                self._pwrite_all(buf[:aligned], offset)
            except _DirectRefusedError:
                # Refused when set, or taken then and refused when written (FUSE, a
                # device whose logical block is larger than ALIGN): from now on, and for
                # this buffer, the writes go through the page cache.
                log.info("the target refuses direct I/O: writing through the page cache")
                self.direct = False
                aligned = 0
        if aligned < len(buf):
            self._set_direct(False)
            self._pwrite_all(buf[aligned:], offset + aligned)
            # Buffered (an unaligned piece, or a file system without O_DIRECT): have the
            # disk take it now, not all at the final fsync (measured on LAMP, when all
            # of a regular file went this way: that fsync alone took 1.2 s of 4.2).
            start_writeback(self.fd, offset + aligned, len(buf) - aligned)
        self.written += len(buf)

    def _pwrite_all(self, buf: memoryview, offset: int) -> None:
        while buf:
            try:
                n = os.pwrite(self.fd, buf, offset)
            except OSError as exc:
                if self._direct_on and exc.errno == errno.EINVAL:
                    raise _DirectRefusedError from exc
                raise FatalError(f"write at byte {offset} failed: {exc.strerror}") from exc
            buf = buf[n:]
            offset += n

    def wipe(self, *, sync: bool = True) -> None:
        """Zero the first MiB (boot sector, partition table, ext4 superblock).

        A regular file with nothing there is left sparse: there is nothing to wipe.
        """
        self._set_direct(False)
        if self.is_block or _has_data(self.fd, HEADER):
            size = device_size(self.fd)
            zeros = memoryview(bytes(min(HEADER, size)))
            self._pwrite_all(zeros, 0)
        if sync:
            self.sync()

    def _wipe_tail(self) -> None:
        size = device_size(self.fd)
        start = max(size - HEADER, self.image_size)
        if start < size:
            self._pwrite_all(memoryview(bytes(size - start)), start)

    def sync(self) -> None:
        self._set_direct(False)
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise FatalError(f"flushing the written image failed: {exc.strerror}") from exc


class _DirectRefusedError(Exception):
    """The target refused O_DIRECT: when it was set, or at a write (EINVAL)."""


def _has_data(fd: int, end: int) -> bool:
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) < end
    except OSError:  # ENXIO: no data at all
        return False


def load_blockmap(source: Source, image: OsImage) -> BlockMap:
    """Fetch the block map and check it against its pin and the data blob."""
    name = image.blockmap.file
    with source.open(name, image.blockmap.size) as f:
        reader = HashingReader(f, image.blockmap, source.describe(name))
        parts = []
        while chunk := reader.read(READ):
            parts.append(chunk)
        reader.verify()
    text = b"".join(parts)
    bmap = parse_blockmap(text)
    if bmap.mapped != image.data.raw_size:
        raise VerificationError(
            f"block map maps {bmap.mapped} bytes, the manifest says {image.data.raw_size}",
        )
    return bmap


def load_checked(source: Source, manifest: Manifest, which: Which = "os") -> BlockMap:
    """The image's block map, once everything about it that can fail before a write has
    passed: the block map fetched and checked (its pin, the data blob, the manifest's
    image size), and the data blob within reach. The agent calls this before it wipes
    the disk, so a broken image leaves the old system as it was."""
    image = _image(manifest, which)
    bmap = load_blockmap(source, image)
    _check_blockmap(manifest, which, bmap)
    _probe(source, image.data)
    return bmap


def _probe(source: Source, blob: Blob) -> None:
    """Read the blob's first byte: it exists, and the server (or directory) serves it.
    The first, not the last: a server that ignores Range would send the whole blob
    to reach the last."""
    with source.open(blob.file, 1, 0) as f:
        if not f.read(1):
            raise VerificationError(
                f"{source.describe(blob.file)} is empty, the manifest says {blob.size} bytes"
            )


def _image(manifest: Manifest, which: Which) -> OsImage:
    if which == "os":
        return manifest.os
    if manifest.single is None:
        raise UserError("this image has no single (homogeneous) image", hint="capture it with --single")
    return manifest.single


@contextmanager
def _aligned_buffer(size: int) -> Iterator[memoryview]:
    # An anonymous mapping is page-aligned, which O_DIRECT requires of the buffer.
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    try:
        yield view
    finally:
        # Slices may still be alive in a traceback's frames; the GC then unmaps it.
        with contextlib.suppress(BufferError):
            view.release()
            buf.close()


def write_os(
    source: Source,
    manifest: Manifest,
    dest: int | HasFileno,
    *,
    which: Which = "os",
    progress: bool = True,
    direct: bool | None = None,
    name: str | None = None,
    bmap: BlockMap | None = None,
) -> WriteResult:
    """Write the OS (or single) image of `manifest` from `source` onto `dest`.

    `dest` is an fd or file object; a regular file must already be at least the image
    size (open_destination grows it). `direct=None` uses O_DIRECT wherever the target
    takes it: a block device, or a regular file on a filesystem that supports it.
    """
    fd = dest if isinstance(dest, int) else dest.fileno()
    label = name or f"fd {fd}"
    image = _image(manifest, which)
    bmap = bmap or load_blockmap(source, image)
    _check_blockmap(manifest, which, bmap)
    block = is_block(fd)
    size = device_size(fd)
    if size < bmap.image_size:
        raise UserError(f"{label} is too small: {size} bytes, the image needs {bmap.image_size}")
    # A regular file too: around the page cache it was 22% faster than through it with
    # each write's writeback started at once (LAMP's OS onto a fresh ext4, 0.87 s against
    # 1.12 s, 6 pairs). A target that refuses O_DIRECT gets buffered writes (Target).
    target = Target(fd, direct=direct is not False, is_block=block, image_size=bmap.image_size)
    start = time.monotonic()
    compressed = 0
    try:
        with _aligned_buffer(HEADER) as held:
            pieces: list[tuple[int, int]] = []  # (offset, length) kept in `held`
            with source.open(image.data.file, image.data.size) as raw:
                reader = HashingReader(raw, image.data, source.describe(image.data.file), behind=True)
                try:
                    with Flusher(f"/proc/self/fd/{fd}"):  # synced as it goes
                        _stream(reader, bmap, target, Held(held, pieces), label if progress else None)
                    reader.verify()
                finally:
                    reader.close()
                compressed = reader.count
            # Everything verified: now, and only now, make the filesystem visible. The
            # data goes to the disk first, so the superblock never lands before it.
            target.sync()
            for batch in superblock_last(pieces):
                for offset, length in batch:
                    target.write(held[offset : offset + length], offset)
                target.sync()
    except BaseException as exc:
        if target.touched:
            _wipe_after(target, label, exc)
        raise
    return WriteResult(
        label,
        which,
        target.written,
        bmap.image_size,
        len(bmap.ranges),
        compressed,
        time.monotonic() - start,
        target.direct,
    )


def _wipe_after(target: Target, label: str, exc: BaseException) -> None:
    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
    log.error("writing %s failed (%s); wiping its first MiB so it cannot be mounted", label, why)
    try:
        target.wipe()
    except (OSError, BootenvError) as wipe_exc:
        log.error("could not wipe %s: %s", label, wipe_exc)


@dataclass(frozen=True)
class Held:
    """The first MiB of the image, kept in an aligned buffer until everything verified."""

    buf: memoryview
    pieces: list[tuple[int, int]]


def _stream(reader: HashingReader, bmap: BlockMap, target: Target, header: Held, label: str | None) -> None:
    """Decompress and write every range, except the header's, which go to `header`."""
    bar = Progress(f"writing {label}", bmap.mapped) if label else None
    dctx = zstandard.ZstdDecompressor()
    try:
        with (
            dctx.stream_reader(reader, read_size=READ, read_across_frames=True, closefd=False) as zin,  # type: ignore[arg-type]
            Prefetch(zin) as ahead,  # decompress on a thread while this one hashes
            _aligned_buffer(CHUNK * BUFFERS) as pool,
            WriteBehind(target.write, _split(pool, BUFFERS)) as behind,  # and writes on another
        ):
            fill = _Fill(behind)
            try:
                for rng in bmap.ranges:
                    _stream_range(ahead, rng, fill, header, bar, reader.name)
                if ahead.read(1):
                    raise VerificationError(f"{reader.name} holds more data than its block map")
            finally:  # on a failure too: what one thread would have written by then
                fill.submit()
            behind.finish()
    except zstandard.ZstdError as exc:
        raise VerificationError(f"{reader.name} is not a valid zstd stream: {exc}") from exc
    finally:
        if bar:
            bar.close()


def _split(pool: memoryview, n: int) -> list[memoryview]:
    size = len(pool) // n
    return [pool[i * size : (i + 1) * size] for i in range(n)]


class _Fill:
    """The buffer being filled: pieces of ranges, each starting aligned, and their writes."""

    def __init__(self, behind: WriteBehind) -> None:
        self.behind = behind
        self.buf = behind.buffer()
        self.used = 0
        self.writes: list[tuple[int, int, int]] = []

    def room(self) -> memoryview:
        """Where the next piece goes (a fresh buffer once this one is full)."""
        if self.used == len(self.buf):
            self.submit()
            self.buf = self.behind.buffer()
        return self.buf[self.used :]

    def add(self, length: int, write_from: int, offset: int) -> None:
        """The piece of `length` bytes just put at `room()`; its bytes from `write_from`
        on go to the target at `offset`."""
        if write_from < length:
            self.writes.append((self.used + write_from, length - write_from, offset))
        # The next piece starts aligned, as O_DIRECT wants of the memory it writes from.
        self.used = min(len(self.buf), -(-(self.used + length) // ALIGN) * ALIGN)

    def submit(self) -> None:
        if not self.used:  # nothing in it (or it went already)
            return
        self.behind.submit(self.buf, self.writes)  # with no writes, it just comes back free
        self.writes = []
        self.used = 0


def _stream_range(
    zin: Prefetch, rng: Range, fill: _Fill, header: Held, bar: Progress | None, name: str
) -> None:
    digest = hashlib.sha256()
    offset, left = rng.offset, rng.length
    while left:
        room = fill.room()
        want = min(left, len(room))
        got = 0
        while got < want:
            data = zin.view(want - got)  # lent until the next view(): copied at once
            n = len(data)
            if not n:
                raise VerificationError(
                    f"the image decompressed from {name} ended early, at image byte {offset}"
                )
            room[got : got + n] = data
            got += n
        piece = room[:got]
        digest.update(piece)
        held = max(0, min(HEADER - offset, got))
        if held:
            header.buf[offset : offset + held] = piece[:held]
            header.pieces.append((offset, held))
        fill.add(got, held, offset + held)
        offset += got
        left -= got
        if bar:
            bar.update(got)
    if digest.hexdigest() != rng.sha256:
        raise VerificationError(
            f"{name}: the image's range at byte {rng.offset} ({rng.length} bytes) does not match its sha256"
        )


def _check_blockmap(manifest: Manifest, which: Which, bmap: BlockMap) -> None:
    if which == "os" and bmap.image_size != manifest.rootfs.image_size:
        raise VerificationError("the block map's image size disagrees with the manifest")
    # Every image is an ext4 filesystem, whose superblock is never all zeros: a map
    # without it would "write" nothing, or a filesystem no one can mount, and succeed.
    if not any(r.offset <= SUPERBLOCK < r.offset + r.length for r in bmap.ranges):
        raise VerificationError(
            f"the block map maps no superblock (byte {SUPERBLOCK}): not a filesystem image"
        )


def superblock_last(pieces: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The held-back header pieces (offset, length) as two batches: what lies past the
    first VISIBLE bytes, then those bytes (the superblock), written after a sync. A kill
    between two pieces then never leaves a new superblock over old metadata."""
    rest, first = [], []
    for offset, length in pieces:
        end = offset + length
        if offset < VISIBLE:
            first.append((offset, min(end, VISIBLE) - offset))
        if end > VISIBLE:
            start = max(offset, VISIBLE)
            rest.append((start, end - start))
    return rest, first


def write_os_path(
    location: str, device: str, *, which: Which = "os", progress: bool = True, trust: Trust | None = None
) -> WriteResult:
    """`bootenv write-os`: check the signature, open the destination, stream, verify.

    `trust=None` skips the signature check (the caller checked it, or a test).
    """
    if trust is None:
        source = open_source(location)
        manifest = parse_manifest(read_manifest(source))
    else:
        source, manifest = open_trusted(location, trust)
    image = _image(manifest, which)
    bmap = load_blockmap(source, image)
    # Before open_destination grows a file to its size. (The data blob is not probed, as
    # the agent's load_checked does: this write touches nothing before its first byte.)
    _check_blockmap(manifest, which, bmap)
    with (
        open_destination(device, bmap.image_size, mapped=bmap.mapped) as dest,
        step(f"Streaming the {which} image to {device}"),
    ):
        return write_os(source, manifest, dest.fd, which=which, progress=progress, name=dest.path, bmap=bmap)
