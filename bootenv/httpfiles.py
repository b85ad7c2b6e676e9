"""Static files over HTTP: single byte ranges and paths that cannot leave their root.

Pure helpers for `bootenv serve`; nginx does the same job at scale (docs/SERVE.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote


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
