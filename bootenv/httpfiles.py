"""Static files over HTTP: single byte ranges and paths that cannot leave their root.

`bootenv serve` answers /images and /boot with `StaticHandler` (GET and HEAD, 200, 206
or 416, an ETag that If-Range must match); `parse_range` and `resolve_under` are its
pure rules. No path resolves outside the served dirs. nginx does the same job at scale
(docs/SERVE.md).
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import re
import stat
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from bootenv.httpconn import AnswerError, BoundedHandler

log = logging.getLogger(__name__)


class UnsatisfiableError(Exception):
    """The range lies outside the file: answer 416."""


_NUMBER = re.compile(r"[0-9]+")
_POSITIONS = 19  # digits of a byte position taken as they are (a 64-bit offset)


def _position(digits: str) -> int:
    """A byte position: as it is up to 19 digits (leading zeros aside), and past the end
    of any file beyond (int() refuses numbers of over 4300 digits, and a request head
    may hold 32 KiB of them)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _POSITIONS else 10**_POSITIONS


def _below(a: str, b: str) -> bool:
    """Whether the position `a` is below `b`, both strings of digits of any length."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    return (len(a), a) < (len(b), b)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, or None for the whole file.

    Only one range is served; a multi-range or malformed header is ignored (RFC 9110
    allows that) and the whole file is sent with 200. Positions may have any number of
    digits (RFC 9110 sets no bound): a last position past the end is the end, a first
    one past it is unsatisfiable (416).
    """
    if not value:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    # ASCII digits only: str.isdigit also takes "²"; anything else is malformed, so ignored.
    if not dash or not _NUMBER.fullmatch(first or "0") or not _NUMBER.fullmatch(last or "0"):
        return None
    if not first:  # suffix: the last N bytes
        if not last:
            return None
        length = _position(last)
        if length == 0 or size == 0:
            raise UnsatisfiableError
        return max(size - length, 0), size - 1
    if last and _below(last, first):
        return None  # malformed: ignored
    start = _position(first)
    if start >= size:
        raise UnsatisfiableError
    return start, min(_position(last), size - 1) if last else size - 1


def resolve_under(root: Path, rel: str) -> Path | None:
    """`root/rel` if it stays inside root after decoding and resolving symlinks."""
    rel = unquote(rel)
    if "\x00" in rel or "\\" in rel:
        return None
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    return path if path.is_relative_to(base) else None


class StaticHandler(BoundedHandler):
    """Answers with a file under a served directory, whole or one byte range of it."""

    def _static(self, root: Path, rel: str, head: bool) -> None:
        try:
            path = resolve_under(root, rel)
        except (OSError, RuntimeError):  # a name too long, a symlink loop: nothing to serve
            raise AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        if path is None:
            raise AnswerError(HTTPStatus.FORBIDDEN, "path leaves the served directory")
        try:
            # O_NONBLOCK: a FIFO's open does not wait for a writer (that held the thread
            # for good); anything but a regular file is refused below.
            f = open(path, "rb", opener=_nonblocking)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        except OSError as exc:
            if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise
            raise AnswerError(HTTPStatus.NOT_FOUND, "not found") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise AnswerError(HTTPStatus.NOT_FOUND, "not found")
            self._send_file(f, st.st_size, st.st_mtime, head)

    def _send_file(self, f: Any, size: int, mtime: float, head: bool) -> None:
        etag = f'"{int(mtime * 1e6):x}-{size:x}"'
        modified = email.utils.formatdate(mtime, usegmt=True)
        header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        # Only the ETag is trusted: a date has one-second precision, and a file replaced
        # within the second of the client's first part would splice two versions. A date
        # (or a changed ETag) gets the whole file, which RFC 9110 allows.
        if if_range and if_range.strip() != etag:
            header = None
        try:
            span = parse_range(header, size)
        except UnsatisfiableError:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span if span else (0, size - 1)
        length = end - start + 1 if size else 0
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header(
            "Content-Type", "application/json" if f.name.endswith(".json") else "application/octet-stream"
        )
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.end_headers()
        if head or not length:
            return
        try:
            sent = self.connection.sendfile(f, start, length)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.debug("%s: client went away: %s", self.address_string(), exc)
            self.close_connection = True
            return
        if sent < length:  # the file shrank while it was sent: the client must see a short body
            log.warning(
                "%s: %s shrank while it was sent (%d of %d bytes)",
                self.address_string(),
                f.name,
                sent,
                length,
            )
            self.close_connection = True


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)
