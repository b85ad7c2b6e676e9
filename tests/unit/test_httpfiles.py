"""Byte ranges as RFC 9110 has them (bootenv/httpfiles.py): positions of any length."""

from __future__ import annotations

import pytest

from bootenv.httpfiles import UnsatisfiableError, parse_range

HUGE = "9" * 20  # valid per RFC 9110, past a 64-bit offset: the old parser ignored it


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (f"bytes=0-{HUGE}", (0, 9)),  # a last position past the end is the end
        (f"bytes=3-{'9' * 5000}", (3, 9)),
        (f"bytes=-{HUGE}", (0, 9)),  # the last N bytes, N past the size: all of them
        ("bytes=" + "0" * 30 + "5-" + "0" * 30 + "7", (5, 7)),  # leading zeros are digits too
        ("bytes=2-18446744073709551616", (2, 9)),  # 2**64
        (f"bytes={'9' * 21}-{HUGE}", None),  # last below first: malformed, ignored
        ("bytes=5-4", None),
    ],
)
def test_positions_of_any_length_are_taken(spec: str, want: tuple[int, int] | None) -> None:
    assert parse_range(spec, 10) == want


@pytest.mark.parametrize(
    "spec", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}9", f"bytes={'1' * 5000}-", "bytes=10-"]
)
def test_a_first_position_past_the_end_is_unsatisfiable(spec: str) -> None:
    with pytest.raises(UnsatisfiableError):
        parse_range(spec, 10)


def test_range_parser_edges() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=9-", 10) == (9, 9)
    assert parse_range("bytes=\u00b2-", 10) is None  # not ASCII digits: malformed
