"""Fuzz the pax reader, and the layout's TreeWriter on what it yields, with hypothesis.

Any input must end in a BootenvError or a clean result: never another exception, never
a file outside the target root. Inputs that once broke this are kept in REGRESSIONS and
run every time.
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootenv.errors import BootenvError
from bootenv.extract import TreeWriter
from bootenv.merge import MergeState
from bootenv.paxread import PaxReader
from tests.hostile.kit import d, f, hard, outside_listing, raw_name, special, sym, tar_bytes

# What the target filesystem may refuse of a hostile archive, which the layout reports as
# the component failing: a name too long, an xattr value too big for an inode (ENOSPC).
REFUSED_BY_TARGET = {errno.ENAMETOOLONG, errno.ENOSPC}


def _seed_archive() -> bytes:
    tagged = f("etc/tagged", "x")
    tagged.pax_headers = {
        "SCHILY.xattr.user.k": "v",
        "SCHILY.acl.access": "user::rw-,user:1000:r--,group::r--,mask::r--,other::---",
    }
    members = [
        d("etc"),
        f("etc/a.conf", "a=1\n"),
        tagged,
        d("usr"),
        f("usr/bin-" + "n" * 120, b"\x7fELF" + bytes(600), mode=0o4755),  # a pax path record
        sym("usr/link", "bin-" + "n" * 120),
        hard("usr/hl", "./etc/a.conf"),
        special("usr/fifo", tarfile.FIFOTYPE),
        f("usr/empty", b""),
    ]
    return tar_bytes(members)


SEED = _seed_archive()


def lay_out(data: bytes, base: Path, *, privileged: bool) -> str | None:
    """Read `data` as an archive and lay it out under base/root; check containment.

    Returns the error it ended with, if any.
    """
    error = None
    root = base / "root"
    root.mkdir()
    (base / "victim").write_text("precious\n")
    writer = TreeWriter(root, "fuzz", privileged=privileged, merge=MergeState(root))
    try:
        reader = PaxReader(io.BytesIO(data), limit=len(data))
        for member in reader:
            writer.place(member, reader)
        reader.drain()
        writer.finish()
    except BootenvError as exc:
        assert "\n" not in str(exc)
        error = str(exc)
    except OSError as exc:
        # The target may refuse what it cannot hold (REFUSED_BY_TARGET); any other
        # OSError is the writer's own fault.
        assert exc.errno in REFUSED_BY_TARGET, exc
        error = str(exc)
    finally:
        writer.close()
    assert outside_listing(base, root) == {"victim"}, "something was written outside the root"
    assert (base / "victim").read_text() == "precious\n"
    return error


def read_only(data: bytes) -> None:
    try:
        reader = PaxReader(io.BytesIO(data), limit=len(data))
        for member in reader:
            assert member.name == "" or not member.name.startswith("/")
            assert ".." not in member.name.split("/")
            for _ in reader.chunks():
                pass
        reader.drain()
    except BootenvError as exc:
        assert "\n" not in str(exc)


def _fresh(tmp_path: Path, tag: str) -> Path:
    base = tmp_path / tag
    base.mkdir()
    return base


_counter = [0]


def _base(tmp_path: Path) -> Path:
    _counter[0] += 1
    return _fresh(tmp_path, f"case{_counter[0]}")


def test_the_seed_archive_lays_out(tmp_path: Path) -> None:
    base = _base(tmp_path)
    assert lay_out(SEED, base, privileged=False) is None
    assert (base / "root/etc/a.conf").read_text() == "a=1\n"
    assert os.readlink(base / "root/usr/link") == "bin-" + "n" * 120


FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    read_only(data)
    lay_out(data, _base(tmp_path), privileged=False)


@pytest.mark.slow
@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(SEED)
    for pos, mask in flips:
        data[pos] ^= mask
    read_only(bytes(data))
    lay_out(bytes(data), _base(tmp_path), privileged=os.geteuid() == 0)


def _blocks(data: bytes) -> list[int]:
    """Offsets of the 512-byte headers of a tar."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos : pos + 512] != bytes(512):
        out.append(pos)
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return out


HEADERS = _blocks(SEED)


def _rechecksum(data: bytearray, hdr: int) -> None:
    chk = sum(data[hdr : hdr + 148]) + 8 * 32 + sum(data[hdr + 156 : hdr + 512])
    data[hdr + 148 : hdr + 156] = b"%06o\0 " % chk


FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
          "mtime": (136, 12), "typeflag": (156, 1), "linkname": (157, 100), "devmajor": (329, 8),
          "devminor": (337, 8), "prefix": (345, 155)}  # fmt: skip


@pytest.mark.slow
@FUZZ
@given(
    st.sampled_from(HEADERS),
    st.sampled_from(sorted(FIELDS)),
    st.one_of(
        st.binary(max_size=160),
        st.sampled_from(
            [b"../../victim", b"/etc/passwd", b"\x80" + b"\xff" * 11, b"\xff" * 12, b"x", b"L", b"K"]
        ),
        st.integers(0, 1 << 40).map(lambda n: b"%011o\0" % n),
    ),
)
def test_mutated_header_fields(tmp_path: Path, hdr: int, field: str, value: bytes) -> None:
    """One header field replaced, with a correct checksum: only the reader's checks remain."""
    data = bytearray(SEED)
    off, length = FIELDS[field]
    data[hdr + off : hdr + off + length] = value[:length].ljust(length, b"\0")
    _rechecksum(data, hdr)
    read_only(bytes(data))
    lay_out(bytes(data), _base(tmp_path), privileged=os.geteuid() == 0)


def _pax(records: list[tuple[str, bytes]]) -> bytes:
    body = b""
    for key, value in records:
        rec = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
        n = len(rec) + 1
        n = len(rec) + len(str(n + len(str(n)) - 1))
        n = len(rec) + len(str(n))
        body += str(n).encode() + rec
    return body


PAX_KEYS = st.sampled_from(
    ["path", "linkpath", "size", "uid", "gid", "mtime", "SCHILY.xattr.user.k", "SCHILY.xattr.",
     "SCHILY.acl.access", "SCHILY.acl.default", "GNU.sparse.major", "GNU.sparse.name",
     "GNU.sparse.realsize", "GNU.sparse.map", "comment"]
)  # fmt: skip
PAX_VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"../x", b"/abs", b"a\0b", b"-1", b"99999999999999999999999", b"1e9", b"1", b"0",
         b"user::rwx,user:\xc2\xb2:r--", b"user:bob:rw-", b"1.5", b"1.x", b"\xff\xfe"]
    ),
)  # fmt: skip


@pytest.mark.slow
@FUZZ
@given(
    st.sampled_from(range(4)),
    st.lists(st.tuples(st.one_of(PAX_KEYS, st.text(max_size=12)), PAX_VALUES), min_size=1, max_size=4),
    st.sampled_from([b"x", b"g"]),
)
def test_added_pax_records(tmp_path: Path, which: int, records: list[tuple[str, bytes]], kind: bytes) -> None:
    """A pax header with hostile records placed before one of the seed's members."""
    members = tar_bytes([f("first", "1"), sym("second", "first"), d("third"), f("fourth", "4" * 700)])
    hdrs = _blocks(members)
    # Every member has its own pax header only when it needs one; ours comes first.
    at = hdrs[min(which, len(hdrs) - 1)]
    body = _pax(records)
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = kind, len(body)
    block = bytearray(hdr.tobuf(format=tarfile.USTAR_FORMAT))
    pad = -len(body) % 512
    data = members[:at] + bytes(block) + body + bytes(pad) + members[at:]
    read_only(data)
    lay_out(data, _base(tmp_path), privileged=os.geteuid() == 0)


# -- inputs that once ended in an unexpected exception (or a multi-line error) ---------


def _field_set(field: str, value: bytes, hdr: int = 0) -> bytes:
    data = bytearray(SEED)
    off, length = FIELDS[field]
    data[hdr + off : hdr + off + length] = value[:length].ljust(length, b"\0")
    _rechecksum(data, hdr)
    return bytes(data)


def _with_pax(**records: bytes) -> bytes:
    member = f("victim-name", "x")
    member.pax_headers = {k: v.decode("utf-8", "surrogateescape") for k, v in records.items()}
    return tar_bytes([member])


def _sym_with_linkpath(target: str) -> bytes:
    link = sym("l", "x")
    link.pax_headers = {"linkpath": target}
    return tar_bytes([link])


def _sparse(map_text: bytes) -> bytes:
    member = f("s", map_text.ljust(512, b"\0") + b"data")
    member.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": "10",
    }
    return tar_bytes([member])


REGRESSIONS: dict[str, bytes] = {
    # OverflowError from os.fchown: a base-256 gid of 2**48
    "gid-base256": _field_set("gid", b"\x80\x01"),
    "uid-pax-huge": _with_pax(uid=b"99999999999999999999999"),
    "mtime-base256": _field_set("mtime", b"\x80" + b"\xff" * 11),
    "devmajor-base256": _field_set("devmajor", b"\x80\xff\xff\xff\xff\xff\xff\xff"),
    # ValueError from int("²"): str.isdigit() accepts superscripts
    "acl-superscript-id": _with_pax(**{"SCHILY.acl.access": "user:::²".encode()}),
    # OverflowError from int.to_bytes(4): an ACL id over 32 bits
    # UnicodeEncodeError: a non-UTF-8 pax path re-encoded for a GNU sparse 1.0 member
    "sparse-name-not-utf8": _with_pax(**{"path": b"\x80", "GNU.sparse.major": b"1"}),
    "acl-huge-id": _with_pax(**{"SCHILY.acl.access": b"user::rw-,user:99999999999:r--,mask::r--,other::---"}),
    # ValueError from the sparse map's int(): not numbers, or a negative count
    "sparse-map-letters": _sparse(b"1\nab\n5\n"),
    "sparse-map-bytes": _sparse(b"1\n\xb2\n1\n"),
    "sparse-map-negative": _sparse(b"-3\n1\n2\n"),
    # ValueError (embedded NUL) from os.symlink and os.setxattr
    "nul-in-linkpath": _sym_with_linkpath("a\0b"),
    "nul-in-xattr-name": _with_pax(**{"SCHILY.xattr.user.a\0b": b"v"}),
    # a raw OSError: symlink("") is ENOENT; setxattr of no name ERANGE, of a bad ACL EINVAL
    "symlink-empty-target": _sym_with_linkpath(""),
    "xattr-empty-name": _with_pax(**{"SCHILY.xattr.": b"v"}),
    "acl-without-group": _with_pax(**{"SCHILY.acl.access": b"user::rw-"}),
    # a newline in a refused name made the error two lines
    "newline-in-absolute-name": tar_bytes([raw_name(f("x", "1"), "/etc\n/x")]),
    "newline-and-escape-in-dotdot-name": tar_bytes([raw_name(f("x", "1"), "a/../\nb\x1b[31m")]),
}


# Inputs that once crashed the reader but are legitimate archives: laying them out is fine.
MAY_SUCCEED = {"sparse-name-not-utf8"}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regressions(tmp_path: Path, case: str) -> None:
    data = REGRESSIONS[case]
    read_only(data)
    for privileged in (False, os.geteuid() == 0):
        error = lay_out(data, _base(tmp_path), privileged=privileged)
        if case in MAY_SUCCEED:
            assert error is None or "\n" not in error, f"{case}: a clean result or one line"
            continue
        assert error is not None and "\n" not in error, f"{case}: refused in one line"
