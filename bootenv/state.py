"""The durable machine store under `--state DIR`.

    DIR/machines/52-54-00-12-34-56.json    the machine record, replaced atomically
    DIR/events/52-54-00-12-34-56.jsonl     every event taken, append-only (and .jsonl.1:
                                           the one before, once it reached LOG_LIMIT)
    DIR/locks/52-54-00-12-34-56.lock       serialises updates (threads and processes)
    DIR/locks/new-records.lock             serialises the records made under a cap

A record is written to a temp file in the same directory, fsynced, renamed over the old
one and the directory fsynced, so a power cut leaves either the old or the new record,
never a torn one. `bootenv assign` and `bootenv serve` may run at the same time: every
update holds the machine's flock, and the server reads the record on every request.

An event that names itself (its sender's "seq" and "time") and was already taken is not
taken again: a callback attempt made again after a timeout, or after a 502 that came
once the server had it, is answered, not logged or counted twice. A sender has one event
in flight at a time, so the store remembers only the last REMEMBERED names of each
sender (machine and source), for the SENDERS heard from last (taken.py); a sender it
does not know (first heard from since the store started, or forgotten since) has its
last names read back from the end of its machine's log first.

An event posted for an assignment the machine no longer has (its callback URL names
another, `machines.superseded`) is refused (`SupersededError`): a run that an
assignment replaced must not move the new one. A record that an event or a menu choice
makes counts against a cap (`StoreFullError`): the count and the new record are one
step for every maker, under one lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootenv.errors import UserError
from bootenv.event_schema import Event, finite
from bootenv.machine_record import RecordError, from_dict, to_dict
from bootenv.machines import Machine, Outcome, State, apply, normalize_mac, superseded
from bootenv.taken import Name, Taken, event_name
from bootenv.writeback import fsync_dir, write_all

log = logging.getLogger(__name__)

LOG_LIMIT = 4 << 20  # bytes of a machine's events log; past it, it is rotated to .jsonl.1
RECALL = 256 << 10  # bytes at the end of a log read back for a sender's last names (a line
# holds a callback body of up to 64 KiB)
CREATING = "new-records.lock"  # under locks/: held while a capped new record is counted and made


class StoreFullError(UserError):
    """A new record would pass the cap: nothing is written."""


class SupersededError(UserError):
    """An event this record does not take (`machines.superseded`): nothing is written.
    `replaced`: the machine was assigned again since the run's assignment, so the run
    must stop; otherwise (no record, a URL naming no assignment) it only goes unheard."""

    def __init__(self, message: str, *, replaced: bool) -> None:
        super().__init__(message)
        self.replaced = replaced


@dataclass(frozen=True)
class Damaged:
    """A record that does not read as a machine (`Store.scan`)."""

    name: str  # its MAC, or its file's name when that names none
    error: UserError  # the message names the machine, the hint the file


def _stem(mac: str) -> str:
    return normalize_mac(mac).replace(":", "-")


class Store:
    """With `readonly`, nothing is made or written: no directory, no lock file (a lock
    that is there is taken, one that is not is done without); `put` and `update` fail."""

    def __init__(self, root: Path, *, readonly: bool = False) -> None:
        self.root = root
        self.readonly = readonly
        self._taken = Taken()
        if readonly:
            return
        for sub in ("machines", "events", "locks"):
            try:
                (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create the state directory {root / sub}: {exc}") from exc

    def _record(self, mac: str) -> Path:
        return self.root / "machines" / f"{_stem(mac)}.json"

    def _events(self, mac: str) -> Path:
        return self.root / "events" / f"{_stem(mac)}.jsonl"

    def _rotated(self, mac: str) -> Path:
        return self.root / "events" / f"{_stem(mac)}.jsonl.1"

    @contextlib.contextmanager
    def _locked(self, mac: str) -> Iterator[None]:
        with self._flock(self.root / "locks" / f"{_stem(mac)}.lock"):
            yield

    @contextlib.contextmanager
    def _flock(self, path: Path) -> Iterator[None]:
        if self.readonly:
            try:
                fd = os.open(path, os.O_RDONLY)  # flock needs no write access
            except FileNotFoundError:  # never updated: nothing to wait for
                yield
                return
        else:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    @contextlib.contextmanager
    def _admitted(self, mac: str, limit: int | None) -> Iterator[None]:
        """Hold the machine's lock. With `limit`, a machine without a record first takes
        the store's creation lock (the two in that order everywhere: no deadlock), under
        which the records are counted and the new one written: past `limit` records,
        StoreFullError, and nothing is made (not even its lock file)."""
        while True:
            new = limit is not None and not self.known(mac)
            with contextlib.ExitStack() as held:
                if new:
                    held.enter_context(self._flock(self.root / "locks" / CREATING))
                    if limit is not None and not self.known(mac) and self.count() >= limit:
                        raise StoreFullError(
                            f"no machine {normalize_mac(mac)}, and {limit} are known: assign it first"
                        )
                held.enter_context(self._locked(mac))
                if new or limit is None or self.known(mac):
                    yield
                    return
            # Its record was removed between the look and the lock: counted as a new one.

    def get(self, mac: str) -> Machine | None:
        path = self._record(mac)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except ValueError as exc:  # not UTF-8
            raise _damaged(mac, path, str(exc)) from exc
        except OSError as exc:  # a directory, a symlink loop, a file it may not read
            raise _damaged(mac, path, exc.strerror or str(exc)) from exc
        try:
            machine = from_dict(json.loads(text))
        except RecordError as exc:
            raise _damaged(mac, path, exc.reason) from exc
        except (ValueError, RecursionError) as exc:  # not JSON
            raise _damaged(mac, path, f"not JSON: {exc}") from exc
        if machine.mac != normalize_mac(mac):
            raise _damaged(mac, path, f"it is the record of {machine.mac}")
        return machine

    def known(self, mac: str) -> bool:
        """Whether the machine has a record (its file exists; nothing is read)."""
        return self._record(mac).exists()

    def count(self) -> int:
        """How many machine records there are (a directory listing, no record read)."""
        with os.scandir(self.root / "machines") as entries:
            return sum(1 for e in entries if e.name.endswith(".json") and not e.name.startswith("."))

    def is_state_dir(self) -> bool:
        """Whether the root holds a store: its machines/ directory (serve and assign make it)."""
        return (self.root / "machines").is_dir()

    def scan(self) -> list[Machine | Damaged]:
        """Every record, in the order of its file's name: a damaged one (or one named for no
        MAC) is a Damaged in its place, so it hides none of the others."""
        out: list[Machine | Damaged] = []
        for path in sorted((self.root / "machines").glob("*.json")):
            try:
                mac = normalize_mac(path.stem)
            except UserError:
                why = UserError(
                    f"{path.name} in the state's machines/ is not named for a MAC address",
                    hint=f"remove {path}",
                )
                out.append(Damaged(path.name, why))
                continue
            try:
                machine = self.get(mac)
            except UserError as exc:
                out.append(Damaged(mac, exc))
                continue
            if machine is not None:  # None: removed since the listing
                out.append(machine)
        return out

    def all(self) -> list[Machine]:
        """Every machine whose record reads; each damaged one is a warning in the log."""
        out = []
        for entry in self.scan():
            if isinstance(entry, Damaged):
                log.warning("%s", entry.error)
            else:
                out.append(entry)
        return out

    def put(
        self,
        machine: Machine,
        *,
        note: dict[str, Any] | None = None,
        only_if: Callable[[Machine | None], bool] | None = None,
        limit: int | None = None,
    ) -> bool:
        """Store a record (an assignment); `note` goes to the events log. With `only_if`,
        only if it holds for the record stored now (read under the machine's lock). With
        `limit`, a new record is refused (StoreFullError) once there are that many."""
        with self._admitted(machine.mac, limit):
            if only_if is not None and not only_if(self.get(machine.mac)):
                return False
            self._write(machine)
            if note is not None:
                self._append(machine.mac, note)
        return True

    def update(
        self,
        mac: str,
        event: Event,
        raw: dict[str, Any],
        *,
        create: Callable[[str, float], Machine],
        assignment: str | None = None,
        limit: int | None = None,
    ) -> Outcome:
        """Apply an event to a machine and log it durably. `assignment` is what the
        callback URL names (None: nothing): an event of another assignment's run is
        refused (SupersededError). A machine with no record is made by `create`, for an
        event that names no assignment, unless `limit` records exist (StoreFullError)."""
        mac = normalize_mac(mac)
        now = time.time()
        if assignment is not None and not self.known(mac):
            # Refused before its lock is taken: no file is made for a MAC nobody knows.
            _refuse_superseded(None, assignment)
        with self._admitted(mac, limit if assignment is None else None):
            machine = self.get(mac)
            _refuse_superseded(machine, assignment)
            machine = machine or create(mac, now)
            sender, name = (mac, event.source), event_name(event, raw)
            if name is not None and not self._taken.knows(sender):
                # First heard from since this store started (or forgotten since): its
                # last names are in its log, so a restart of serve takes no event twice.
                self._taken.recall(sender, self._logged_names(mac, event.source))
            if name is not None and self._taken.has(sender, name):
                log.debug("%s: event %d of the %s taken already", mac, name[0], event.source)
                return Outcome(machine, changed=False, repeated=True)
            outcome = apply(machine, event, now=now)
            entry: dict[str, Any] = {"received": now, **raw, "state": outcome.machine.state.value}
            if outcome.invalid:
                entry["invalid"] = outcome.invalid
                log.warning("%s: invalid transition: %s", mac, outcome.invalid)
            # The record first: a crash between the two then leaves the event unlogged,
            # so its sender's retry is taken (a transition only moves forward: applied
            # twice, it is the same). Logged first, the retry was known and refused, and
            # the record kept the state from before it for good.
            self._write(outcome.machine)
            self._append(mac, entry)
            if name is not None:
                self._taken.add(sender, name)
        return outcome

    def events(self, mac: str, *, budget: int | None = None) -> list[dict[str, Any]]:
        """The machine's events, oldest first: those of the rotated log, then the current
        one's; with `budget`, only the whole lines among the last `budget` bytes of them.
        Read under the machine's lock: a rotation between the two files' reads would
        give the same events twice."""
        try:
            with self._locked(mac):
                return self._read_events(mac, budget)
        except PermissionError:  # a reader who may not write the lock file: as before, unlocked
            return self._read_events(mac, budget)

    def _read_events(self, mac: str, budget: int | None) -> list[dict[str, Any]]:
        data = b""
        for path in (self._events(mac), self._rotated(mac)):  # newest first
            want = None if budget is None else budget - len(data)
            if want is not None and want <= 0:
                break
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    start = 0 if want is None else max(0, size - want)
                    f.seek(max(0, start - 1))  # and the byte before: is a line cut?
                    chunk = f.read()
            except FileNotFoundError:
                continue
            if start:  # up to the window's first line start: a line cut, or just its "\n"
                chunk = chunk[chunk.find(b"\n") + 1 :] if b"\n" in chunk else b""
            if chunk and not chunk.endswith(b"\n"):
                chunk += b"\n"  # a torn last line: a line of its own, skipped below
            data = chunk + data
        out = []
        for line in data.decode(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping a torn line in the events log", mac)  # a power cut mid-append
        return out

    def _logged_names(self, mac: str, source: str) -> list[Name]:
        """The names of the sender's events among the last RECALL bytes of the log."""
        names = []
        for entry in self._read_events(mac, RECALL):  # under the lock already (update)
            if not isinstance(entry, dict) or entry.get("source", "agent") != source:
                continue
            seq, when = entry.get("seq"), finite(entry.get("time"))  # an older serve checked no time
            if type(seq) is int and when is not None:
                names.append((seq, when))
        return names

    def _write(self, machine: Machine) -> None:
        assert not self.readonly, "a read-only Store writes nothing"
        path = self._record(machine.mac)
        data = json.dumps(to_dict(machine), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)

    def _append(self, mac: str, entry: dict[str, Any]) -> None:
        """Append one line (under the machine's lock). A line a power cut tore is ended
        first, so that this one is a line of its own, not glued to the fragment."""
        assert not self.readonly, "a read-only Store writes nothing"
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        path = self._events(mac)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size + len(line) > LOG_LIMIT:
                # Bounded: the current log becomes the rotated one (the older is dropped).
                os.replace(path, self._rotated(mac))
                fsync_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _refuse_superseded(machine: Machine | None, assignment: str | None) -> None:
    why = superseded(machine, assignment)
    if why is not None:
        replaced = assignment is not None and machine is not None and machine.assignment is not None
        raise SupersededError(why, replaced=replaced)


def _damaged(mac: str, path: Path, why: str) -> UserError:
    """The message names the machine (serve answers clients with it); the hint, for the
    admin, names the file."""
    return UserError(
        f"the record of {normalize_mac(mac)} is damaged: {why}", hint=f"restore {path}, or remove it"
    )


def default_state_dir() -> Path:
    """`$BOOTENV_STATE`, else /var/lib/bootenv."""
    return Path(os.environ.get("BOOTENV_STATE") or "/var/lib/bootenv")


TIMELINE = (
    State.PROVISIONING,
    State.OS_WRITTEN,
    State.OS_BOOTED,
    State.COMPONENTS_LAID_OUT,
    State.DONE,
)


def timeline_rows(machines: list[Machine]) -> list[list[str]]:
    """`bootenv machines`: one row per machine, each milestone as seconds since assignment."""
    rows = [["mac", "state", "image", "components", *[s.value for s in TIMELINE], "conflicts"]]
    for m in machines:
        marks = []
        for s in TIMELINE:
            at = m.reached(s)
            marks.append("-" if at is None else f"+{at - m.started:.1f}s")
        rows.append([m.mac, m.state.value, m.image or "?", m.components or "?", *marks, str(m.conflicts)])
    return rows
