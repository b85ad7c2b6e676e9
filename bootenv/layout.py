"""`bootenv layout`: lay out component sub-images in a root tree, with parallel streams.

Each stream is a process (CPU-bound tar parsing does not scale with threads) that
fetches, decompresses, verifies and lays out one component at a time (extract.py).
When every stream is done, the parent merges the dpkg status of the components that
verified, in name order, and activates them: ldconfig, daemon-reload, units. Progress
goes to the log and, best effort, to a callback URL as JSON events.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from bootenv.callback import Callback, Event
from bootenv.conflicts import clean_stale
from bootenv.dpkgmerge import merge_component_status
from bootenv.errors import BootenvError, UserError, VerificationError
from bootenv.extract import TreeWriter
from bootenv.journal import Journal, syncfs
from bootenv.log import human_bytes, step
from bootenv.manifest import Component, resolve_components
from bootenv.merge import MergeState
from bootenv.paxread import PaxReader
from bootenv.run import run, which
from bootenv.signing import Trust
from bootenv.source import load_manifest, open_source
from bootenv.trusted import open_trusted

log = logging.getLogger(__name__)

MAX_STREAMS = 4
FAILED_UNIT = "failed to start: "  # activation note of a unit that is not active


@dataclass(frozen=True)
class LayoutConfig:
    image: str  # DIR or URL
    components: str | tuple[str, ...]  # "all", "none" or names
    root: Path
    streams: int = 0  # 0: one per component, capped at MAX_STREAMS
    callback: str | None = None
    trust: Trust | None = None  # None: the caller checked the signature already (tests)


@dataclass(frozen=True)
class ComponentResult:
    name: str
    status: str  # done, resumed (already laid out by an earlier run), failed
    files: int = 0
    bytes: int = 0
    identical: int = 0
    merged: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class LayoutResult:
    components: tuple[ComponentResult, ...]
    added: tuple[str, ...]  # pulled in as dependencies
    notes: tuple[str, ...]  # what activation did or skipped

    @property
    def failed_units(self) -> tuple[str, ...]:
        return tuple(n[len(FAILED_UNIT) :] for n in self.notes if n.startswith(FAILED_UNIT))

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.components) and not self.failed_units

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


class Activator(Protocol):
    def __call__(self, root: Path, units: list[str]) -> list[str]: ...


def parse_components(arg: str) -> str | tuple[str, ...]:
    if arg in ("all", "none"):
        return arg
    names = tuple(n.strip() for n in arg.split(",") if n.strip())
    if not names:
        raise UserError("--components needs all, none or a comma-separated list")
    return names


def layout(
    cfg: LayoutConfig,
    *,
    activator: Activator | None = None,
    emit: Callable[[Event], None] | None = None,
) -> LayoutResult:
    """Plan (resolve components), run the streams, then merge dpkg status and activate."""
    root = cfg.root.absolute()
    if not root.is_dir():
        raise UserError(f"{cfg.root} is not a directory")
    manifest = load_manifest(cfg.image) if cfg.trust is None else open_trusted(cfg.image, cfg.trust)[1]
    wanted = cfg.components if isinstance(cfg.components, str) else list(cfg.components)
    order, added = resolve_components(manifest, wanted)
    if added:
        log.info("Added as dependencies: %s", ", ".join(added))
    comps = sorted((manifest.component(n) for n in order), key=lambda c: c.name)
    clean_stale(root)  # a killed run's half-written conflict records
    poster = Callback(cfg.callback, "layout", emit=emit)
    if root.resolve() == Path("/"):
        poster.post("os_booted")  # the layout service runs in the freshly booted OS
    try:
        results = _run_streams(cfg.image, comps, root, cfg.streams, poster)
        journal = Journal(root)
        final: list[ComponentResult] = []
        for comp, got in zip(comps, results, strict=True):
            res = got
            if res.status != "failed":
                pkgs = tuple(merge_component_status(root, comp.name))
                if not journal.reached(comp.name, comp.data.sha256, "dpkg"):
                    journal.set(comp.name, comp.data.sha256, "dpkg")
                res = ComponentResult(**{**asdict(res), "packages": pkgs})
            final.append(res)
            poster.send(_brief(res))
            for cid in res.conflicts:
                poster.post("conflict", component=res.name, fatal=False, data={"id": cid})
        good = [c for c, r in zip(comps, final, strict=True) if r.status != "failed"]
        units = [u for c in good for u in c.units]
        with step(f"Activating {', '.join(c.name for c in good) or 'nothing'}"):
            notes = (activator or activate)(root, units) if good else []
        for c in good:
            journal.set(c.name, c.data.sha256, "done")
        result = LayoutResult(tuple(final), tuple(added), tuple(notes))
        if result.ok:
            poster.post("components_laid_out", data={"notes": list(notes)})
            poster.post("done")
        else:
            failed = [c.name for c in final if c.status == "failed"]
            failed += [f"unit {u}" for u in result.failed_units]
            poster.post("error", message=f"layout failed: {', '.join(failed)}")
        return result
    finally:
        poster.close()


def _brief(r: ComponentResult) -> Event:
    """A component's end, as a step event naming the component."""
    event: Event = {
        "event": "step",
        "step": "component",
        "status": "failed" if r.status == "failed" else "done",
        "component": r.name,
        "files": r.files,
        "bytes": r.bytes,
        "elapsed": r.seconds,
        "data": {"result": r.status, "conflicts": len(r.conflicts)},
    }
    if r.error:
        event["message"] = r.error[:4000]
    return event


def default_streams(n: int) -> int:
    return max(1, min(n, MAX_STREAMS))


def _run_streams(
    image: str, comps: list[Component], root: Path, streams: int, poster: Callback
) -> list[ComponentResult]:
    streams = streams or default_streams(len(comps))
    privileged = os.geteuid() == 0
    if streams <= 1 or len(comps) <= 1:
        _SINK[:] = [poster.send]
        try:
            return [_stream(image, c, root, privileged) for c in comps]
        finally:
            _SINK.clear()
    ctx = get_context("fork")
    events: Any = ctx.Queue()
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(events, poster, stop), daemon=True)
    pump.start()
    try:
        with ProcessPoolExecutor(
            streams, mp_context=ctx, initializer=_init_worker, initargs=(events,)
        ) as pool:
            futures: list[Future[ComponentResult]] = [
                pool.submit(_stream, image, c, root, privileged) for c in comps
            ]
            return [f.result() for f in futures]
    finally:
        stop.set()
        pump.join()


def _pump(events: Any, poster: Callback, stop: threading.Event) -> None:
    while True:
        try:
            poster.send(events.get(timeout=0.1))
        except queue.Empty:
            if stop.is_set():
                return


_SINK: list[Callable[[Event], None]] = []  # where a stream's events go (set per process)


def _init_worker(events: Any) -> None:
    _SINK[:] = [events.put]
    # A stream must not outlive the layout that started it (kill -9 of the parent).
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _emit(event: Event) -> None:
    for sink in _SINK:
        sink(event)


class _Hashing:
    """Hash and count the compressed bytes as they stream past."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _stream(image: str, comp: Component, root: Path, privileged: bool) -> ComponentResult:
    """One stream: fetch, decompress, verify and lay out one component."""
    start = time.monotonic()
    journal = Journal(root)
    if journal.reached(comp.name, comp.data.sha256, "files"):
        log.info("%s: already laid out by an earlier run", comp.name)
        return ComponentResult(comp.name, "resumed")
    _emit(
        {
            "event": "step",
            "step": "component",
            "status": "start",
            "component": comp.name,
            "total": comp.data.size,
        }
    )
    log.info("%s: laying out %d files (%s)", comp.name, comp.files, human_bytes(comp.data.raw_size))
    writer = TreeWriter(root, comp.name, privileged=privileged, merge=MergeState(root))
    try:
        src = open_source(image).open(comp.data.file, comp.data.size)
        try:
            hashing = _Hashing(src)
            _lay_out(comp, hashing, writer)
        finally:
            src.close()
        if hashing.size != comp.data.size or hashing.sha.hexdigest() != comp.data.sha256:
            raise VerificationError(f"{comp.name}: sub-image does not match its sha256; not activated")
        writer.finish()
    except (BootenvError, OSError, zstandard.ZstdError) as exc:
        log.error("%s: %s", comp.name, exc)
        return ComponentResult(comp.name, "failed", error=str(exc), seconds=time.monotonic() - start)
    finally:
        writer.close()
    syncfs(root)
    journal.set(comp.name, comp.data.sha256, "files")
    s = writer.stats
    took = time.monotonic() - start
    log.info("%s: %d files, %s in %.1f s", comp.name, s.files, human_bytes(s.bytes), took)
    return ComponentResult(
        comp.name,
        "done",
        s.files,
        s.bytes,
        s.identical,
        tuple(s.merged),
        tuple(s.conflicts),
        tuple(s.warnings),
        seconds=took,
    )


def _lay_out(comp: Component, src: _Hashing, writer: TreeWriter) -> None:
    dctx = zstandard.ZstdDecompressor()
    try:
        with dctx.stream_reader(src, read_size=1 << 20, closefd=False) as z:  # type: ignore[arg-type]
            reader = PaxReader(z, limit=comp.data.raw_size)
            last = time.monotonic()
            for member in reader:
                writer.place(member, reader)
                now = time.monotonic()
                if now - last >= 1.0:
                    last = now
                    s = writer.stats
                    _emit({"event": "progress", "component": comp.name, "files": s.files, "bytes": s.bytes})
            reader.drain()
    except zstandard.ZstdError as exc:
        raise VerificationError(f"{comp.name}: corrupt zstd stream: {exc}") from exc
    while src.read(1 << 20):
        pass  # trailing bytes still count towards the hash


def activate(root: Path, units: list[str]) -> list[str]:
    """ldconfig, daemon-reload and units; anything impossible here is skipped with a note."""
    notes: list[str] = []
    live = root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()
    if os.geteuid() != 0:
        return ["not root: ldconfig and systemctl skipped"]
    try:
        run([which("ldconfig")] if live else [which("ldconfig"), "-r", root])
        notes.append("ldconfig done")
    except BootenvError as exc:
        notes.append(f"ldconfig skipped: {exc}")
    if not units:
        return notes
    try:
        systemctl = which("systemctl")
    except UserError:
        return [*notes, "systemctl not found: units not started"]
    if live:
        run([systemctl, "daemon-reload"], check=False)
        # What a package's postinst would have done: the runtime directories
        # (tmpfiles.d, e.g. /run/mysqld) and system users (sysusers.d) of the new files.
        # Boot ran systemd-tmpfiles before the component's configuration existed.
        for tool in ("systemd-sysusers", "systemd-tmpfiles"):
            args = ["--create"] if tool == "systemd-tmpfiles" else []
            with contextlib.suppress(BootenvError):
                run([which(tool), *args], check=False)
        run([systemctl, "enable", *units], check=False)
        # Sockets first, as at boot (sockets.target comes before multi-user.target): a
        # socket refuses to start once its service is already running.
        sockets = [u for u in units if u.endswith(".socket")]
        for batch in (sockets, [u for u in units if u not in sockets]):
            if batch:
                run([systemctl, "start", *batch], check=False)
        for unit in units:
            if run([systemctl, "is-active", "--quiet", unit], check=False).returncode == 0:
                notes.append(f"started {unit}")
                continue
            notes.append(f"{FAILED_UNIT}{unit}")
            # The unit's own words, where the admin watching the console will see them.
            try:
                journal = run(["journalctl", "-u", unit, "-n", "25", "--no-pager", "-o", "cat"], check=False)
            except BootenvError:
                continue
            for line in journal.stdout.decode(errors="replace").splitlines():
                log.warning("%s: %s", unit, line)
        return notes
    wants = list((root / "etc/systemd/system").glob("*.wants"))
    missing = [u for u in units if not any(os.path.lexists(d / u) for d in wants)]
    if missing:
        proc = run([systemctl, f"--root={root}", "enable", *missing], check=False)
        notes.append(
            f"enabled {' '.join(missing)} offline" if proc.returncode == 0 else "offline enable failed"
        )
    notes.append("not the running system: units start at next boot")
    return notes
