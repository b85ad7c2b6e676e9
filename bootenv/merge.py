"""The shared-path rule: what happens when a stream finds a path already taken.

A stream never overwrites what another stream or the OS image put in place. When it
finds its path taken (sharedpaths.py decides which case it is):

- **Identical** (same type; same bytes, symlink target or device number; same owner,
  group, mode and xattrs): nothing.
- **Mergeable text config**: both versions are regular files under `/etc`, at most
  1 MiB each, and text: UTF-8 with no control bytes but whitespace (a key or other
  binary file under /etc may hold no NUL byte), with the same owner, group, mode and
  xattrs (a component's 0600 file is never merged into a 0644 one). The result is the
  concatenation of the OS version (the *base*, if the OS had the file) followed by every
  component's version in component-name order, each piece ending in a newline, a piece
  equal to the base or to an earlier piece included once (equal but for CRLF line ends
  or the newlines at its end included). It depends only on *which* components provided
  the file, never on the order they arrived, so parallel and sequential layouts agree.
  The merged file keeps the owner, group and mode of the file in place, and the merge is
  listed for the admin's review (`merged: review`, conflicts.py): a directive both
  versions hold is there twice.
- **Anything else** (binaries, differing types, the same bytes or text with another
  owner, group, mode or xattrs): a conflict, see `conflicts.py`.

To rebuild the merge whatever the arrival order, every version is recorded under
`/var/lib/bootenv/layout/merge/<hash of path>/` (the base and one part per component,
each written atomically) and the file is rebuilt from the records under a per-path
lock. A part recorded twice is the same part, so a re-run after a crash never appends
anything twice. A component that *places* a new text file under /etc first leaves an
empty marker naming itself and the content's hash, so whoever merges into it later can
tell a component's file from the OS's.

A merge never replaces a file the admin has changed since: `ours` in the path's records
holds the sha256 of every content bootenv put (or offered) there, written before the
file is replaced, so a kill -9 at any point leaves the file in place one of them. A file
that is none of them is the admin's: it stays, and the new merge goes to the conflict
store as a conflict (sharedpaths.py), which `bootenv conflicts` shows and resolves. So
does the first merge into a file a component placed (its marker says so) that no longer
holds what that component placed: the admin edited it, and nothing of it is taken for
the OS's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bootenv.errors import FatalError
from bootenv.writeback import write_durably

STATE = Path("var/lib/bootenv/layout")
MAX_MERGE = 1 << 20


@dataclass(frozen=True)
class Meta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int


# The bytes text config does not hold: the C0 controls but tab, newline, vertical tab,
# form feed and carriage return; and DEL.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\v\f\r") + b"\x7f"


def is_text(data: bytes) -> bool:
    """UTF-8 with no control bytes but whitespace. A random 32-byte key holds no NUL
    seven times in eight, so the absence of NUL alone does not make text."""
    if len(data.translate(None, _CONTROL)) != len(data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_candidate(relpath: str, data: bytes) -> bool:
    """True when `data` at `relpath` could be merged (the other side is checked too)."""
    return relpath.startswith("etc/") and len(data) <= MAX_MERGE and is_text(data)


def normalized(piece: bytes) -> bytes:
    """A piece as the duplicate check sees it: LF line ends, no newline at its end. A
    copy saved with CRLF, or without its last newline, is the same config."""
    return piece.replace(b"\r\n", b"\n").rstrip(b"\n")


def concatenate(base: bytes | None, parts: dict[str, bytes]) -> bytes:
    """The merge of a base and per-component parts, in component-name order."""
    pieces: list[bytes] = []
    seen: set[bytes] = set()
    for piece in ([base] if base is not None else []) + [parts[k] for k in sorted(parts)]:
        key = normalized(piece)
        if key in seen:
            continue
        seen.add(key)
        pieces.append(piece)
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(p if p.endswith(b"\n") or not p else p + b"\n" for p in pieces)


def path_key(relpath: str) -> str:
    return hashlib.sha256(relpath.encode(errors="surrogateescape")).hexdigest()[:32]


def record_dir(root: Path, relpath: str) -> Path:
    """Where the merge records of `relpath` are kept under ROOT."""
    return root / STATE / "merge" / path_key(relpath)


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole, durably before its name: a record is the only copy of the
    OS's version of a merged file, and on ext4 a rename may reach the disk before the
    data of a file written just before it, leaving the name on an empty file after a
    power cut. Merges are rare (a few files of /etc), so the syncs cost little."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing behind
        raise


def clean_stale_markers(root: Path) -> None:
    """Remove the owner markers' temp files a killed run left (each is named by its
    process, so no later run would reuse and remove it); called before a layout runs,
    under its lock, so no stream of this run is writing one."""
    try:
        entries = list(os.scandir(root / STATE / "owners"))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class MergeState:
    """The records of mergeable shared paths under ROOT/var/lib/bootenv/layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.owners = root / STATE / "owners"
        self.merge = root / STATE / "merge"
        self.owners.mkdir(parents=True, exist_ok=True)
        self.merge.mkdir(parents=True, exist_ok=True)

    def mark(self, relpath: str, component: str, data: bytes, *, placed: bool) -> None:
        """Leave a marker that `component` provides `data` at `relpath` (first kind wins)."""
        name = f"{path_key(relpath)}.{component}.{content_key(data)}"
        # Written whole, then linked into place: a reader never sees a marker without
        # its kind (an empty file read mid-write would pass a component's file for the
        # OS's). link() fails if the marker exists, so the first kind still wins.
        # A failure (a full disk) while it is written removes it too.
        tmp = self.owners / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(b"placed" if placed else b"")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.owners / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _markers(self, relpath: str, data: bytes | None) -> dict[str, bool]:
        """Components that marked exactly this content at `relpath` (any content if
        `data` is None): name -> placed."""
        prefix = path_key(relpath) + "."
        want = None if data is None else content_key(data)
        out: dict[str, bool] = {}
        for entry in os.scandir(self.owners):
            if not entry.name.startswith(prefix) or entry.name.endswith(".tmp"):
                continue
            comp, _, key = entry.name[len(prefix) :].rpartition(".")
            if want is None or key == want:
                with open(entry.path, "rb") as f:
                    out[comp] = f.read() == b"placed" or out.get(comp, False)
        return out

    def initialized(self, relpath: str) -> bool:
        return (record_dir(self.root, relpath) / "init").exists()

    @contextlib.contextmanager
    def locked(self, relpath: str) -> Iterator[Path]:
        d = record_dir(self.root, relpath)
        d.mkdir(exist_ok=True)
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)

    def merge_into(
        self,
        relpath: str,
        component: str,
        data: bytes,
        meta: Meta,
        read_existing: Callable[[], tuple[bytes, Meta]],
        apply: Callable[[bytes, Meta], None],
        *,
        identical: bool = False,
        edited: Callable[[bytes, Meta], None] | None = None,
        review: Callable[[bytes, dict[str, bytes]], None] | None = None,
    ) -> bool:
        """Record `component`'s version and rebuild the file; True if it changed.

        `read_existing` returns the file in place; `apply` atomically replaces it. Both
        run under the per-path lock, so concurrent streams merge one at a time. When the
        component brings exactly what is in place (`identical`), its version is only
        marked unless a merge has begun; deciding that under the lock means a merge
        starting at the same moment either sees the mark or is seen here. A file in
        place that no merge wrote (the admin's edit) is left alone: the merge goes to
        `edited` instead (the conflict store), or nowhere.

        The merged file gets the owner, group and mode of the file in place: the caller
        merges only a version whose own agree with them (a component's 0600 secret is
        never merged into a 0644 file), and an admin's chmod of a merged file stays.

        Once the file in place is the merge, `review` gets it and every component's
        part, still under the lock: the last merge lists them all, whichever came first.
        """
        with self.locked(relpath) as d:
            if identical and not (d / "init").exists():
                self.mark(relpath, component, data, placed=False)
                return False
            current, cur_meta = read_existing()
            if not (d / "init").exists():
                self._begin(d, relpath, current, cur_meta)
            self._save(d, f"part.{component}", data, meta)
            content, rebuilt, parts = self._rebuild(d)
            merged_meta = Meta(cur_meta.mode, cur_meta.uid, cur_meta.gid, rebuilt.mtime_ns)
            if content == current:
                if review is not None:
                    review(content, parts)
                return False
            changed = self._put(d, current, content, merged_meta, apply, edited)
            if changed and review is not None:
                review(content, parts)
            return changed

    def _begin(self, d: Path, relpath: str, current: bytes, cur_meta: Meta) -> None:
        """The first merge at the path: the file in place is the base, a component's
        part (those it holds what they placed of), or the admin's edit."""
        owners = self._markers(relpath, current)
        theirs = False
        if any(owners.values()):
            for comp in owners:
                self._save(d, f"part.{comp}", current, cur_meta)
        elif any(self._markers(relpath, None).values()):
            # A component placed the file, and it no longer holds what that
            # component placed: an edit of the admin's, neither the OS's base
            # nor bootenv's own. It stays; the merge is offered beside it.
            theirs = True
        else:
            self._save(d, "base", current, cur_meta)
        _atomic_write(d / "path", relpath.encode(errors="surrogateescape"))
        self._own(d, set() if theirs else {_sha(current)})
        _atomic_write(d / "init", b"")

    def _put(
        self,
        d: Path,
        current: bytes,
        content: bytes,
        meta: Meta,
        apply: Callable[[bytes, Meta], None],
        edited: Callable[[bytes, Meta], None] | None,
    ) -> bool:
        """Put the merge `content` in place of `current`; True if it is there now, False if
        `current` is the admin's edit (the merge goes to `edited`, or nowhere)."""
        ours = self._ours(d)
        if ours is not None and _sha(current) not in ours:
            # Offered, and so bootenv's own should the admin take it (`--keep incoming`).
            self._own(d, {*ours, _sha(content)})
            if edited is not None:
                edited(content, meta)
            return False
        self._own(d, {_sha(current), _sha(content)})  # a kill during apply leaves either
        apply(content, meta)
        self._own(d, {_sha(content)})
        return True

    def _ours(self, d: Path) -> set[str] | None:
        """The sha256 of each content a merge put (or offered) at the path; None for
        records from before they were kept (any content in place is then taken as ours)."""
        try:
            return set((d / "ours").read_bytes().decode("ascii").split())
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            raise _damaged(d, exc) from exc

    def _own(self, d: Path, digests: set[str]) -> None:
        _atomic_write(d / "ours", "".join(f"{h}\n" for h in sorted(digests)).encode())

    def _save(self, d: Path, name: str, data: bytes, meta: Meta) -> None:
        _atomic_write(d / name, data)
        _atomic_write(d / f"{name}.meta", json.dumps(asdict(meta)).encode())

    def _rebuild(self, d: Path) -> tuple[bytes, Meta, dict[str, bytes]]:
        """The merge, the metadata of its first piece, and each component's part."""
        base = (d / "base").read_bytes() if (d / "base").exists() else None
        parts: dict[str, bytes] = {}
        for entry in sorted(os.listdir(d)):
            if entry.startswith("part.") and not entry.endswith((".meta", ".tmp")):
                meta_file = d / f"{entry}.meta"
                if meta_file.exists():  # the part is complete once its meta is there
                    parts[entry[5:]] = (d / entry).read_bytes()
        if base is None and not parts:
            raise _damaged(d, "neither a base nor a part")
        first = "base" if base is not None else f"part.{sorted(parts)[0]}"
        try:
            meta = Meta(**json.loads((d / f"{first}.meta").read_bytes()))
        except (ValueError, TypeError) as exc:  # not JSON, or not a Meta's fields
            raise _damaged(d, exc) from exc
        return concatenate(base, parts), meta, parts


def _damaged(d: Path, what: object) -> FatalError:
    return FatalError(
        f"the merge records in {d} are damaged ({what})",
        hint=f"restore them, or remove that directory: the file {d / 'path'} names is then taken as the OS's",
    )
