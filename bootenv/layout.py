"""`bootenv layout`: lay out component sub-images in a root tree, with parallel streams.

Each stream is a process (CPU-bound tar parsing does not scale with threads) that
decompresses and lays out one piece of a component at a time (stream.py, extract.py): a
chunk, or the whole blob when it has none. The parent schedules the pieces (most work
first, schedule.py), and fetches and verifies each one ahead of the streams
(fetchahead.py): a stream is only ever given bytes that matched the manifest. Around the
streams (run by streampool.py), this module resolves the components, holds the root's
lock and refuses a symlink on the way to bootenv's records (layout_root.py), first
removes what killed runs left under temp names (sweep.py), tries a failure that may pass
again, and stops at the deadline. When every stream is done, the parent merges
the dpkg status (and the alternatives shared with the OS: altmerge.py) of the
components that verified, in name order, and activates them:
ldconfig, daemon-reload, units. Progress goes to the log and, best effort, to a callback
URL as JSON events.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from bootenv.activate import FAILED_UNIT, activate
from bootenv.altmerge import merge_component_alternatives
from bootenv.callback import Callback, Event
from bootenv.conflicts import clean_stale
from bootenv.dpkgmerge import merge_component_status
from bootenv.errors import BootenvError, RetryableError, UserError
from bootenv.hold import hold, release
from bootenv.journal import Journal
from bootenv.layout_root import alone, refuse_symlinked_state
from bootenv.log import step
from bootenv.manifest import Component, resolve_components
from bootenv.merge import clean_stale_markers
from bootenv.schedule import ComponentResult
from bootenv.signing import Trust
from bootenv.source import load_manifest
from bootenv.streampool import run_streams
from bootenv.sweep import sweep
from bootenv.trusted import open_trusted

log = logging.getLogger(__name__)

RETRY_WAITS = (10.0, 30.0, 60.0, 120.0, 300.0)  # before each try again, the last one repeated
# No try starts unless, as long as the last one took, it ends within this of the first
# try's start: the first-boot unit allows 2 h, and a try it kills posts no fatal error.
RETRY_BUDGET = 90 * 60.0
STOPPED = "layout stopped by a signal before it ended (the system shutting down?); a re-run resumes"


@dataclass(frozen=True)
class LayoutConfig:
    image: str  # DIR or URL
    components: str | tuple[str, ...]  # "all", "none" or names
    root: Path
    streams: int = 0  # 0: one per piece (a chunk, or a blob without chunks), up to streampool.MAX_STREAMS
    callback: str | None = None
    trust: Trust | None = None  # None: the caller checked the signature already (tests)
    force: bool = False  # root / although bootenv did not provision this system
    retries: int = 0  # a failure that may pass if tried again is tried again, this many times
    # Seconds: past it the layout stops, and fails (a re-run resumes). Armed with SIGALRM,
    # so only a layout run on the main thread (the CLI's) may have one.
    deadline: float | None = None


@dataclass(frozen=True)
class LayoutResult:
    components: tuple[ComponentResult, ...]
    added: tuple[str, ...]  # pulled in as dependencies
    notes: tuple[str, ...]  # what activation did or skipped
    seconds: float = 0.0  # the whole layout, activation included

    @property
    def failed_units(self) -> tuple[str, ...]:
        return tuple(n[len(FAILED_UNIT) :] for n in self.notes if n.startswith(FAILED_UNIT))

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.components) and not self.failed_units

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def failure(self) -> BootenvError | None:
        """What went wrong, as one error for the CLI: every failed component's reason,
        and the exit code of data that did not verify if any did, else the first's."""
        failed = [c for c in self.components if c.status == "failed"]
        if not failed and not self.failed_units:
            return None
        reasons = [_named(c.name, _first_line(c.error or "failed")) for c in failed]
        reasons += [f"unit {u} did not start" for u in self.failed_units]
        codes = [c.code or 1 for c in failed] or [1]
        err = BootenvError("layout failed: " + "; ".join(reasons))
        err.exit_code = 4 if 4 in codes else codes[0]
        return err


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _named(name: str, reason: str) -> str:
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


class Activator(Protocol):
    def __call__(self, root: Path, units: list[str]) -> list[str]: ...


def parse_components(arg: str) -> str | tuple[str, ...]:
    if arg in ("all", "none"):
        return arg
    names = tuple(n.strip() for n in arg.split(","))
    if not all(names):
        raise UserError(f"--components {arg}: needs all, none or a comma-separated list of names")
    return names


def layout(
    cfg: LayoutConfig,
    *,
    activator: Activator | None = None,
    emit: Callable[[Event], None] | None = None,
) -> LayoutResult:
    """Plan (resolve components), run the streams, then merge dpkg status and activate.

    A failure is posted to the callback as an error, also one that stops the layout
    before it has a result (the image unreachable, a bad signature), so the server shows
    why the machine stopped. With `cfg.retries`, a failure that may pass if tried again
    (RetryableError: the network, a stream killed) is tried again after a wait of
    RETRY_WAITS, that many times while another try as long as the last would end within
    RETRY_BUDGET, as a re-run would: what is done stays done. Its error is posted as not
    fatal, saying when it is tried again. Stopped by a signal, it posts STOPPED, not
    fatal: a shutdown stops it so, and the first-boot unit runs it again at the next
    boot. Past `cfg.deadline` it stops as a signal stops it, and posts that as fatal: no
    one runs it again (the first-boot unit's own timeout would kill it unheard)."""
    try:
        with contextlib.nullcontext() if cfg.deadline is None else _deadline(cfg.deadline):
            return _tries(cfg, activator, emit)
    except KeyboardInterrupt as stop:  # SIGTERM too (cli.TerminatedError), and _Expired
        # Posted here, once the try's own poster has closed: whenever the stop came,
        # during a try, its wait, or that poster's closing.
        expired = isinstance(stop, _Expired)
        message = str(stop) if expired else STOPPED
        with contextlib.closing(Callback(cfg.callback, "layout", emit=emit)) as poster:
            poster.post("error", message=message, fatal=expired)
        if expired:
            raise RetryableError(message) from None
        raise


class _Expired(KeyboardInterrupt):
    """The deadline passed (its message says so): raised in the main thread by SIGALRM's
    handler, and, as Ctrl-C is, not caught by the `except Exception` of code it
    interrupts."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Expired in the main thread `seconds` from now, unless the block has ended.
    A forked stream keeps the handler but not the timer."""

    def expire(signum: int, frame: object) -> None:
        raise _Expired(f"layout did not finish within its deadline of {seconds:.0f} s; a re-run resumes")

    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _tries(
    cfg: LayoutConfig, activator: Activator | None, emit: Callable[[Event], None] | None
) -> LayoutResult:
    """layout()'s tries: the first, and those its retries allow."""
    began = time.monotonic()
    for attempt in range(cfg.retries + 1):
        # Its thread starts once the streams are forked (streampool.run_streams): none runs before.
        poster = Callback(cfg.callback, "layout", emit=emit, deferred=True)
        tried = time.monotonic()
        try:
            result, failure = _try(cfg, poster, began, activator)
            if failure is None:
                assert result is not None
                return result
            wait = RETRY_WAITS[min(attempt, len(RETRY_WAITS) - 1)]
            now = time.monotonic()
            again = (
                attempt < cfg.retries
                and _retryable(failure, result)
                and now + wait + (now - tried) - began < RETRY_BUDGET
            )
            message = _first_line(str(failure)) if str(failure).strip() else type(failure).__name__
            if again:
                message += f"; trying again in {wait:.0f} s (try {attempt + 2} of {cfg.retries + 1})"
            poster.post("error", message=message[:4000], fatal=not again)
            if not again:
                if result is not None:
                    return result
                raise failure
        finally:
            poster.close()
        log.warning("%s", message)
        time.sleep(wait)
    raise AssertionError("unreachable: the last try returns or raises")


def _try(
    cfg: LayoutConfig, poster: Callback, began: float, activator: Activator | None
) -> tuple[LayoutResult | None, Exception | None]:
    """One try: its result, and what failed (None if nothing did)."""
    try:
        result = _layout(cfg, poster, began, activator)
    except Exception as exc:
        return None, exc
    return result, result.failure()


def _retryable(failure: Exception, result: LayoutResult | None) -> bool:
    """A failure that may pass if tried again: a RetryableError; or a result in which a
    component failed so, and none failed for what it is (data that did not verify, a
    refused merge) nor any unit to start (those would fail the same way again)."""
    if result is None:
        return isinstance(failure, BootenvError) and failure.exit_code == RetryableError.exit_code
    codes = {c.code for c in result.components if c.status == "failed"}
    return codes == {RetryableError.exit_code} and not result.failed_units


def _layout(cfg: LayoutConfig, poster: Callback, began: float, activator: Activator | None) -> LayoutResult:
    # Resolved first: a symlinked root (`--root /mnt/t -> /srv/t`) is the tree it names,
    # which everything below reaches without following a symlink (atfd's O_NOFOLLOW).
    try:
        root = cfg.root.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise UserError(f"{cfg.root} is not a directory ({exc})") from exc
    if not root.is_dir():
        raise UserError(f"{cfg.root} is not a directory")
    refuse_symlinked_state(root)
    if root == Path("/") and not cfg.force:
        from bootenv.target import LAYOUT_JSON, provisioned

        if not provisioned(root):
            raise UserError(
                "refusing to lay out into the running system: bootenv did not provision it "
                f"(no {LAYOUT_JSON})",
                hint="--root a mounted target; or --force, to add components to this system's files "
                "and its dpkg database",
            )
    if root == Path("/"):
        poster.post("os_booted")  # the layout service runs in the freshly booted OS
    comps: list[Component] = []
    added: list[str] = []
    offered: set[str] | None = None  # the image's components, once it is read
    # Nothing to lay out reads no image: the single image's first boot, or an image that
    # was a directory of the ramdisk's, which the installed system cannot reach.
    if cfg.components != "none":
        manifest = load_manifest(cfg.image) if cfg.trust is None else open_trusted(cfg.image, cfg.trust)[1]
        wanted = cfg.components if isinstance(cfg.components, str) else list(cfg.components)
        order, added = resolve_components(manifest, wanted)
        if added:
            log.info("Added as dependencies: %s", ", ".join(added))
        comps = sorted((manifest.component(n) for n in order), key=lambda c: c.name)
        offered = {c.name for c in manifest.components}
    with alone(root):  # the first write to the root: after the image is trusted
        return _lay_out(cfg, root, comps, added, offered, poster, began, activator)


def _lay_out(
    cfg: LayoutConfig,
    root: Path,
    comps: list[Component],
    added: list[str],
    offered: set[str] | None,
    poster: Callback,
    began: float,
    activator: Activator | None,
) -> LayoutResult:
    clean_stale(root)  # a killed run's half-written conflict records ...
    clean_stale_markers(root)  # ... and owner markers
    # ... and temp names, also of the components this run does not lay out: under the
    # lock, so no other layout's temps are taken for a killed one's.
    sweep(root, {c.name for c in comps}, offered)
    journal = Journal(root)
    _guarded(
        "not held back during the layout",
        hold,
        root,
        {c.name: c.units for c in comps if not journal.reached(c.name, c.data.sha256, "done")},
    )
    results = run_streams(cfg.image, comps, root, cfg.streams, poster, began)
    merged = [
        got if got.status == "failed" else _merge_dpkg(root, comp, got, journal)
        for comp, got in zip(comps, results, strict=True)
    ]
    final = _blocked_by_dependencies(comps, merged)
    for res in final:
        poster.send(_brief(res))
        for cid in res.conflicts:
            poster.post("conflict", component=res.name, fatal=False, data={"id": cid})
    good = [c for c, r in zip(comps, final, strict=True) if r.status != "failed"]
    for c in good:  # laid out: their units may start (a failed one's stay held)
        _guarded(f"{c.name}: units still held back", release, root, c.name, c.units)
    units = [u for c in good for u in c.units]
    with step(f"Activating {', '.join(c.name for c in good) or 'nothing'}"):
        notes = (activator or activate)(root, units) if good else []
    for c in good:
        journal.set(c.name, c.data.sha256, "done")
    result = LayoutResult(tuple(final), tuple(added), tuple(notes), time.monotonic() - began)
    if result.ok:
        poster.post("components_laid_out", data={"notes": list(notes)})
        poster.post("done")
    return result  # a failure is posted by layout()


def _guarded(what: str, fn: Callable[..., None], *args: Any) -> None:
    """Holding units back is a safeguard, not the layout's work: one that fails (a
    symlinked /etc/systemd/system) is logged, and the layout goes on."""
    try:
        fn(*args)
    except (BootenvError, OSError) as exc:
        log.warning("%s: %s", what, exc)


def _blocked_by_dependencies(comps: list[Component], results: list[ComponentResult]) -> list[ComponentResult]:
    """The results, with each component that depends (directly or not) on one that failed
    marked failed too, with that one's exit code: its files are in and its dpkg status
    merged (the journal says so, and a re-run finds them done), but its units are not
    started without what they need. Started, they would fail, and a failed unit is not
    tried again, where the dependency's failure (a download that gave up) may be."""
    by_name = {r.name: r for r in results}
    depends = {c.name: c.depends for c in comps}
    changed = True
    while changed:  # until no more blocks: a chain of dependents is a few rounds
        changed = False
        for name, res in by_name.items():
            if res.status == "failed":
                continue
            dep = next((d for d in depends[name] if d in by_name and by_name[d].status == "failed"), None)
            if dep is not None:
                why = f"not activated: it depends on {dep}, which failed"
                by_name[name] = replace(res, status="failed", error=why, code=by_name[dep].code or 1)
                changed = True
    return [by_name[r.name] for r in results]


def _merge_dpkg(root: Path, comp: Component, res: ComponentResult, journal: Journal) -> ComponentResult:
    """Merge a laid-out component's dpkg paragraphs and its shared alternatives: its
    result, with its packages; or failed (not activated) if the merge was refused (a
    symlink its archive planted)."""
    kept: list[str] = []
    try:
        pkgs = tuple(merge_component_status(root, comp.name, kept))
        chosen = merge_component_alternatives(root, comp.name)  # warnings: the admin's groups kept
    except (BootenvError, OSError) as exc:
        log.error("%s: dpkg status not merged: %s", comp.name, exc)
        code = exc.exit_code if isinstance(exc, BootenvError) else 1
        error = f"dpkg status not merged: {exc}"
        return ComponentResult(**{**asdict(res), "status": "failed", "error": error, "code": code})
    if not journal.reached(comp.name, comp.data.sha256, "dpkg"):
        journal.set(comp.name, comp.data.sha256, "dpkg")
    warnings = (*res.warnings, *(f"dpkg database left as it was: {k}" for k in kept), *chosen)
    return ComponentResult(**{**asdict(res), "packages": pkgs, "warnings": warnings})


def _brief(r: ComponentResult) -> Event:
    """A component's end, as a step event naming the component."""
    event: Event = {
        "event": "step",
        "step": "component",
        "status": "failed" if r.status == "failed" else "done",
        # Not the machine's failure by itself: layout() posts that, fatal or not (tried again).
        "fatal": False,
        "component": r.name,
        "files": r.files,
        "bytes": r.bytes,
        "elapsed": r.seconds,
        "data": {"result": r.status, "conflicts": len(r.conflicts)},
    }
    if r.error:
        event["message"] = r.error[:4000]
    return event
