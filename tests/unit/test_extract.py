"""The streaming pax reader and the TreeWriter, on archives built in Python."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from bootenv import extract
from bootenv.atfd import TMP_PREFIX
from bootenv.extract import TreeWriter
from bootenv.merge import MergeState
from bootenv.paxread import ArchiveError, PaxReader, _num, safe_name
from bootenv.prefetch import Prefetch
from bootenv.writeback import write_all
from bootenv.xattrs import acl_xattr
from tests.hostile.kit import d, f, hard, sym, tar_bytes


def test_reader_matches_tarfile() -> None:
    long = "usr/share/" + "deep/" * 40 + "file.txt"
    members = [
        d("usr"),
        f(long, "x" * 1000, mode=0o4755, uid=7, gid=8),
        sym("usr/l", "../target"),
        hard("usr/h", "./" + long),
    ]
    members.append(f("usr/caps", b"\x7fELF", **{"SCHILY.xattr.security.capability": "c"}))
    data = tar_bytes(members)
    reader = PaxReader(io.BytesIO(data), chunk=700)
    got = []
    for m in reader:
        got.append((m.name, m.kind, m.mode, m.uid, m.gid, m.linkname, reader.read_all()))
    assert got[0] == ("usr", "dir", 0o755, 0, 0, "", b"")
    assert got[1] == (long, "file", 0o4755, 7, 8, "", b"x" * 1000)
    assert got[2][:2] == ("usr/l", "symlink") and got[2][5] == "../target"
    assert got[3][1] == "hardlink" and got[3][5] == long
    assert [t.name.removeprefix("./") for t in tarfile.open(fileobj=io.BytesIO(data))] == [g[0] for g in got]


@pytest.mark.parametrize("block", [513, 4096, 65_536])
def test_reader_over_a_prefetch_gives_every_byte_although_it_reuses_the_blocks(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a Prefetch, the reader hands out views of blocks that are refilled once read.
    Here a block is overwritten with junk the moment it is handed back, so a view used
    past its turn, or a header or pax record read across a block's end, gives wrong bytes."""
    give_back = Prefetch._give_back

    def scribble(self: Prefetch) -> None:
        if self._held is not None:
            self._held[:] = b"\xa5" * len(self._held)
        give_back(self)

    monkeypatch.setattr(Prefetch, "_give_back", scribble)
    rng = random.Random(block)
    members: list[tarfile.TarInfo] = [d("etc"), d("usr")]
    for i in range(60):
        size = rng.choice([0, 1, 511, 512, 513, 5000, 70_000, 300_000])
        where = "etc" if i % 3 == 0 else "usr"
        big_pax = {"SCHILY.xattr.user.k": "v" * rng.choice([10, 3000])}
        members.append(f(f"{where}/f{i}" + "x" * rng.choice([0, 120]), rng.randbytes(size), **big_pax))
    data = tar_bytes(members)
    want = {
        t.name.removeprefix("./"): (t.pax_headers.get("SCHILY.xattr.user.k", ""), tf.extractfile(t).read())  # type: ignore[union-attr]
        for tf in [tarfile.open(fileobj=io.BytesIO(data))]
        for t in tf
        if t.isfile()
    }
    got = {}
    with Prefetch(io.BytesIO(data), block=block, depth=1) as ahead:
        reader = PaxReader(ahead, chunk=block)
        for i, m in enumerate(reader):
            if m.kind != "file":
                continue
            if i % 2:
                body = reader.read_all()  # the chunks are joined after the last was read
            else:
                out = io.BytesIO()
                for chunk in reader.chunks():
                    out.write(chunk)
                body = out.getvalue()
            got[m.name] = (dict(m.xattrs).get("user.k", b"").decode(), body)
        reader.drain()
    assert got == want


def test_xattrs_are_read_from_pax_records() -> None:
    reader = PaxReader(io.BytesIO(tar_bytes([f("a", "1", **{"SCHILY.xattr.user.k": "v"})])))
    (m,) = list(reader)
    assert m.xattrs == (("user.k", b"v"),)


def test_sparse_1_0_member() -> None:
    sparse_map = b"2\n0\n4\n8192\n3\n".ljust(512, b"\0")
    body = sparse_map + b"headtail"
    member = f("GNUSparseFile.0/s", body)
    member.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "./var/s",
        "GNU.sparse.realsize": "8195",
    }
    reader = PaxReader(io.BytesIO(tar_bytes([member])))
    m = next(iter(reader))
    assert m.name == "var/s" and m.sparse == ((0, 4), (8192, 3)) and m.realsize == 8195
    assert reader.read_all() == b"headtail"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a\0b", "x" * 300])
def test_unsafe_names_are_refused(bad: str) -> None:
    with pytest.raises(ArchiveError):
        safe_name(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"0000644\0", 0o644),  # GNU tar: digits, then a NUL
        (b"000644 \0", 0o644),  # old tars: a space, then a NUL
        (b"    17 \0", 0o17),  # leading spaces
        (b"12\0garbage", 0o12),  # the number ends at the first NUL
        (b"\0" * 8, 0),
        (b"        ", 0),
        (b"\x80" + (1 << 40).to_bytes(7, "big"), 1 << 40),  # GNU base-256
        (b"\xff" + (2).to_bytes(7, "big"), -2),
    ],
)
def test_header_numbers(field: bytes, value: int) -> None:
    assert _num(field) == value


@pytest.mark.parametrize("field", [b"0000xyz\0", b"99\0"])
def test_a_header_number_that_is_not_octal_is_an_error(field: bytes) -> None:
    with pytest.raises(ArchiveError, match="bad number"):
        _num(field)


def test_a_long_name_of_short_parts_is_kept_whole() -> None:
    name = "/".join(["d" * 200] * 15)  # 3 014 bytes: over 255, no part over it
    assert safe_name("./" + name) == name
    with pytest.raises(ArchiveError, match="too long"):
        safe_name("/".join(["d" * 200] * 21))  # 4 220 bytes


def test_safe_names_are_normalised() -> None:
    assert safe_name("./etc//apache2/./x") == "etc/apache2/x"
    assert safe_name("./") == ""


def test_truncated_archive_is_an_error() -> None:
    data = tar_bytes([f("a", "x" * 5000)])
    reader = PaxReader(io.BytesIO(data[:2048]))
    with pytest.raises(ArchiveError):
        for _ in reader:
            reader.read_all()


def test_corrupt_header_checksum_is_an_error() -> None:
    data = bytearray(tar_bytes([f("a", "x")]))
    data[0] ^= 1
    with pytest.raises(ArchiveError):
        list(PaxReader(io.BytesIO(bytes(data))))


def _lay_out(root: Path, archive: bytes, *, privileged: bool, component: str = "alpha") -> None:
    writer = TreeWriter(root, component, privileged=privileged, merge=MergeState(root))
    try:
        reader = PaxReader(io.BytesIO(archive))
        for m in reader:
            writer.place(m, reader)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("header", "value"),
    [("SCHILY.xattr.", "v"), ("SCHILY.acl.access", "user::rw-")],  # no name; an ACL without its group
    ids=["empty xattr name", "incomplete ACL"],
)
def test_an_xattr_the_filesystem_refuses_as_malformed_is_an_archive_error(
    tmp_path: Path, header: str, value: str
) -> None:
    """ERANGE or EINVAL from setxattr is the archive's doing: one clear error, not an OSError."""
    with pytest.raises(ArchiveError, match="refused by the filesystem"):
        _lay_out(tmp_path, tar_bytes([f("x", "x", **{header: value})]), privileged=os.geteuid() == 0)


def test_a_stale_temp_of_a_directory_another_stream_made_is_cleared(tmp_path: Path) -> None:
    # A run killed between making a directory's temp and renaming it leaves the temp;
    # on the re-run another component made the directory first. The temp must go.
    (tmp_path / "opt/x").mkdir(parents=True)
    stale = tmp_path / f"opt/{TMP_PREFIX}beta~2"  # member 2 of beta's first piece
    stale.mkdir()
    _lay_out(
        tmp_path, tar_bytes([d("opt"), d("opt/x"), f("opt/x/y", "1")]), privileged=False, component="beta"
    )
    assert sorted(p.name for p in (tmp_path / "opt").iterdir()) == ["x"]
    assert (tmp_path / "opt/x/y").read_text() == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_every_file_gets_its_owner_in_a_setgid_directory_too(tmp_path: Path) -> None:
    # The writer skips chown for a file created with the owner it should have. A file made
    # in a setgid directory takes the directory's group, not the creator's: one that
    # should be root's group must still be given it.
    archive = tar_bytes(
        [
            d("shared", mode=0o2775, gid=50),
            f("shared/root", "1"),
            f("shared/staff", "2", gid=50),
            f("www", "3", uid=33, gid=33),
            f("plain", "4"),
        ]
    )
    _lay_out(tmp_path, archive, privileged=True)
    owners = {
        name: (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        for name in ("shared", "shared/root", "shared/staff", "www", "plain")
        for st in [(tmp_path / name).lstat()]
    }
    assert owners == {
        "shared": (0, 50, 0o2775),
        "shared/root": (0, 0, 0o644),
        "shared/staff": (0, 50, 0o644),
        "www": (33, 33, 0o644),
        "plain": (0, 0, 0o644),
    }


def _modes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_mode & 0o7777
        for p in root.rglob("*")
        if not p.relative_to(root).as_posix().startswith("var")  # the writer's own state
    }


MODES = {"a": 0o644, "b": 0o664, "c": 0o755, "d": 0o600, "e": 0o777, "f": 0o640, "g": 0o444}
SPECIAL = {"s": 0o4755, "t": 0o2755, "u": 0o1777, "v": 0o4700, "w": 0o2700}


def _archive(prefix: str, modes: dict[str, int], owners: dict[str, int]) -> bytes:
    return tar_bytes(
        [f(f"{prefix}{n}", n, mode=m, uid=owners.get(n, 0), gid=owners.get(n, 0)) for n, m in modes.items()]
    )


def test_every_file_gets_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    # A file made with its final mode skips the chmod only if it got that mode: the umask
    # strips bits of some (0664, 0755, 0777 under 027); chown clears setuid and setgid.
    root = os.geteuid() == 0
    modes = MODES | (SPECIAL if root else {})
    owners = {"v": 33, "w": 33, "a": 33, "c": 33} if root else {}
    old = os.umask(0o027)
    try:
        _lay_out(tmp_path, _archive("", modes, owners), privileged=root)
    finally:
        os.umask(old)
    assert _modes(tmp_path) == modes


def test_every_file_gets_its_mode_under_a_default_acl(tmp_path: Path) -> None:
    # Under a default ACL the new file's mode comes from the ACL, not the umask.
    (tmp_path / "acl").mkdir()
    try:
        os.setxattr(
            tmp_path / "acl", "system.posix_acl_default", acl_xattr("user::r-x,group::---,other::---")
        )
    except OSError as exc:
        pytest.skip(f"this filesystem takes no default ACL: {exc.strerror}")
    _lay_out(tmp_path, _archive("acl/", MODES, {}), privileged=os.geteuid() == 0)
    assert _modes(tmp_path) == {f"acl/{n}": m for n, m in MODES.items()} | {"acl": 0o755}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o705, 0o044, 0o644, 0o755, 0o600, 0o4755])
def test_a_file_awaiting_its_owner_grants_nobody_more_than_it_will(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    # Until its chown (and for good, if a kill -9 comes first) a file is root's: root's
    # group holds its group bits, and its final owner and group are "others". Made with
    # its final mode then, 0640 would let root's group read what only group 42 may, and
    # 0604 would let group 42 read what it may not.
    seen = {}
    chown = os.fchown

    def spy(fd: int, uid: int, gid: int) -> None:
        seen[uid] = os.fstat(fd).st_mode & 0o7777
        chown(fd, uid, gid)

    monkeypatch.setattr(os, "fchown", spy)
    old = os.umask(0o022)
    try:
        _lay_out(tmp_path, tar_bytes([f("x", "x", mode=mode, uid=42, gid=42)]), privileged=True)
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o7777 == mode
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    early_group, early_other = (seen[42] >> 3) & 7, seen[42] & 7
    assert not seen[42] & 0o7000, oct(seen[42])
    assert not early_other & ~(owner & group & other), oct(seen[42])
    assert not early_group & ~other, oct(seen[42])


def test_a_hardlink_lands_in_its_own_directory_when_the_directory_cache_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hardlink's directory is opened first, then its target's: with the cache full,
    # opening the second must not close the first (its number would be the second's).
    monkeypatch.setattr(extract, "MAX_OPEN_DIRS", 1)
    archive = tar_bytes([d("a"), d("b"), d("c"), f("a/f", "1"), f("b/g", "2"), hard("c/h", "a/f")])
    _lay_out(tmp_path, archive, privileged=False)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/f",
        "b/g",
        "c/h",
    ]
    assert (tmp_path / "c/h").stat().st_ino == (tmp_path / "a/f").stat().st_ino


def test_write_all_finishes_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))  # 3 bytes a call
    with open(tmp_path / "out", "wb") as out:
        write_all(out.fileno(), b"0123456789")
    assert (tmp_path / "out").read_bytes() == b"0123456789"
