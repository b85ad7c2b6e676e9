"""Load drivers: N clients streaming an image, M agents posting events. Also for `make bench`.

    result = stream_clients("http://127.0.0.1:8080/images/lamp", clients=32, workdir=tmp)
    log.info("%s", result.summary())

Each client is a forked process writing to its own files: the OS sub-image through
write_os (Range resume, verification, held-back header, exactly as the agent does) and
every component blob through HttpSource. The parent checks every result by sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import random
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bootenv.blockmap import pack_image
from bootenv.httpreader import RetryPolicy
from bootenv.manifest import MANIFEST, Component, Manifest, OsImage, RootFs, Source, parse_manifest
from bootenv.oswrite import write_os
from bootenv.source import HttpSource, read_manifest
from bootenv.store import BlobWriter, write_blob

log = logging.getLogger(__name__)

MiB = 1 << 20
POLICY = RetryPolicy(attempts=4, backoff=0.05, max_backoff=0.5, timeout=30.0)


@dataclass(frozen=True)
class Built:
    dir: Path
    manifest: Manifest
    os_sha256: str  # of the whole raw OS image, holes included


def build_image(images: Path, name: str = "lamp", *, os_size: int = 8 * MiB, seed: int = 5) -> Built:
    """images/NAME: a sparse OS image with a block map, and three random component blobs."""
    rng = random.Random(seed)
    out = images / name
    out.mkdir(parents=True)
    raw = bytearray(os_size)
    for off, n in ((0, 8192), (MiB, 2 * MiB), (5 * MiB, 512 * 1024), (os_size - 4096, 4096)):
        raw[off : off + n] = (
            rng.randbytes(n // 2) + b"bootenv load test " * (n // 2 // 18) + bytes(n // 2 % 18)
        )
    img = images / f".{name}-os.img"
    with open(img, "wb") as f:
        f.truncate(os_size)
        for off, n in ((0, 8192), (MiB, 2 * MiB), (5 * MiB, 512 * 1024), (os_size - 4096, 4096)):
            f.seek(off)
            f.write(raw[off : off + n])
    with BlobWriter(out, "img.zst") as blob:
        bmap = pack_image(img, blob, block_size=4096)
        data = blob.finish(bmap.mapped)
    img.unlink()
    os_image = OsImage(data, write_blob(out, "bmap.json", bmap.to_json().encode()), ("base-files",), 3)
    comps = tuple(
        Component(cname, write_blob(out, "tar.zst", rng.randbytes(size)), (cname,), (), 1, ())
        for cname, size in (("apache", 3 * MiB + 17), ("mysql", 5 * MiB + 3), ("php", MiB))
    )
    manifest = Manifest(
        Source("gold", "Debian 12", "amd64", "6.1", "2024-01-01T00:00:00Z"),
        RootFs("ext4", os_size, os_size, 4096),
        os_image,
        comps,
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return Built(out, manifest, hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class ClientResult:
    index: int
    error: str | None
    hashes: dict[str, str]  # "os" and each component name -> sha256 of what was written
    bytes: int  # compressed bytes received


@dataclass(frozen=True)
class StreamResult:
    clients: tuple[ClientResult, ...]
    seconds: float
    errors: tuple[str, ...]
    mismatches: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.clients)

    def summary(self) -> str:
        mib = self.bytes / MiB
        return (
            f"{len(self.clients)} clients streamed {mib:.1f} MiB in {self.seconds:.2f} s "
            f"({mib / self.seconds:.1f} MiB/s aggregate), {len(self.errors)} errors, "
            f"{len(self.mismatches)} mismatches"
        )


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _client(index: int, url: str, workdir: str, start: float, conn: object) -> None:
    """One client: the OS image through write_os, then every component blob, to files."""
    out = Path(workdir) / f"client{index:03d}"
    got: dict[str, str] = {}
    received = 0
    error = None
    try:
        out.mkdir()
        while time.time() < start:  # everyone starts together
            time.sleep(0.005)
        source = HttpSource(url, POLICY)
        manifest = parse_manifest(read_manifest(source))
        disk = out / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(manifest.rootfs.image_size)
        with open(disk, "r+b") as f:
            res = write_os(source, manifest, f.fileno(), progress=False, name=str(disk))
        received += res.compressed
        got["os"] = _sha_file(disk)
        disk.unlink()  # keep the disk use of 32 clients flat
        for comp in manifest.components:
            h = hashlib.sha256()
            path = out / comp.data.file
            with source.open(comp.data.file, comp.data.size) as reader, open(path, "wb") as sink:
                while chunk := reader.read(MiB):
                    sink.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
            got[comp.name] = _sha_file(path)
            path.unlink()
    except Exception as exc:  # reported to the parent, which fails the run
        error = f"{type(exc).__name__}: {exc}"
    conn.send(ClientResult(index, error, got, received))  # type: ignore[attr-defined]


def stream_clients(url: str, built: Built, workdir: Path, *, clients: int = 32) -> StreamResult:
    """`clients` forked processes stream the image at `url`; every result checked by sha256."""
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 0.5
    procs = []
    for i in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client, args=(i, url, str(workdir), start, child), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    results: list[ClientResult] = []
    for i, (proc, parent) in enumerate(procs):
        if parent.poll(300):
            results.append(parent.recv())
        else:
            results.append(ClientResult(i, "no answer within 300 s", {}, 0))
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    seconds = time.time() - start
    want = {"os": built.os_sha256, **{c.name: c.data.sha256 for c in built.manifest.components}}
    errors = tuple(f"client {r.index}: {r.error}" for r in results if r.error)
    mismatches = tuple(
        f"client {r.index}: {name}"
        for r in results
        if not r.error
        for name in want
        if r.hashes.get(name) != want[name]
    )
    result = StreamResult(tuple(results), seconds, errors, mismatches)
    log.info("load: %s", result.summary())
    return result


# -- callbacks ---------------------------------------------------------------------


@dataclass
class PostResult:
    agents: int
    events: int
    seconds: float
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.agents} agents posted {self.agents * self.events} events in {self.seconds:.2f} s "
            f"({self.agents * self.events / self.seconds:.0f} events/s), {len(self.failures)} failures"
        )


def mac_of(index: int) -> str:
    return f"52:54:00:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"


def event_body(n: int) -> dict[str, object]:
    if n == 0:
        return {"event": "start", "source": "agent", "seq": 0, "data": {"n": 0}}
    return {
        "event": "progress",
        "source": "agent",
        "step": "write-os",
        "bytes": n * 4096,
        "seq": n,
        "data": {"n": n},
    }


def post_events(base_url: str, *, agents: int = 200, events: int = 10) -> PostResult:
    """`agents` threads, each posting `events` numbered events for its own MAC, in order."""
    barrier = threading.Barrier(agents)
    result = PostResult(agents, events, 0.0)
    lock = threading.Lock()

    def agent(i: int) -> None:
        mac = mac_of(i)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(60)
        for n in range(events):
            req = urllib.request.Request(
                f"{base_url}/callback/{mac}",
                data=json.dumps(event_body(n)).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    if resp.status != 200:
                        raise OSError(f"HTTP {resp.status}")
            except OSError as exc:
                with lock:
                    result.failures.append(f"{mac} event {n}: {exc}")

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    result.seconds = time.monotonic() - start
    log.info("load: %s", result.summary())
    return result
