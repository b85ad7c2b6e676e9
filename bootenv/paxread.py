"""A lean streaming reader of the POSIX pax archives GNU tar writes for components.

Python's tarfile builds a TarInfo per member and reads pax headers through several
layers; this reader parses each 512-byte header once and hands the data out in chunks,
which roughly doubles the files/s. Read from a stream that lends its blocks (a
Prefetch), it hands out views of those blocks (no copy of the data). It understands
what `tar --format=posix` produces: pax `x`/`g` headers (path, linkpath, size, uid,
gid, mtime, SCHILY.xattr.*, SCHILY.acl.* where no ACL xattr says the same, GNU sparse
1.0), GNU long names, base-256 numbers. Every length is bounded, so a hostile archive
can make it fail but not allocate without limit.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from bootenv.errors import FatalError

BLOCK = 512
MAX_HEADER = 1 << 20  # a pax or long-name header larger than this is hostile
MAX_REALSIZE = 1 << 42  # 4 TiB: the largest sparse file we agree to create
_ID_LIMIT = (1 << 32) - 1  # uid, gid, device major/minor: 32 bits, and -1 means "unchanged"
_NS_LIMIT = 1 << 63  # mtime in ns: a signed 64-bit time

KINDS = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "chr",
    b"4": "blk",
    b"5": "dir",
    b"6": "fifo",
}


class ArchiveError(FatalError):
    """The archive is malformed or hostile."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # Messages quote names from the archive, which may hold newlines or escapes:
        # keep the error one line and the terminal safe.
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        super().__init__(shown, hint=hint)


@dataclass(frozen=True)
class Member:
    name: str  # normalised relative path ("etc/apache2/apache2.conf"); "" is the root
    kind: str  # file, hardlink, symlink, chr, blk, dir, fifo
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int  # bytes of data stored in the archive
    linkname: str  # symlink target as stored; hardlink target normalised like `name`
    rdev: tuple[int, int]
    xattrs: tuple[tuple[str, bytes], ...]
    acls: tuple[tuple[str, str], ...]  # ("access"|"default", text)
    sparse: tuple[tuple[int, int], ...] | None = None  # (offset, length) of the data
    realsize: int = 0


def safe_name(raw: str) -> str:
    """Normalise an archive name; refuse absolute names, `..`, NUL and overlong parts."""
    if "\0" in raw:
        raise ArchiveError(f"archive name with a NUL byte: {raw!r}")
    if raw.startswith("/"):
        raise ArchiveError(f"absolute archive name refused: {raw}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    size = len(raw.encode(errors="surrogateescape"))
    if size > 255 or ".." in parts:  # else no part can be too long (most names: one encode)
        for part in parts:
            if part == "..":
                raise ArchiveError(f"archive name with '..' refused: {raw}")
            if len(part.encode(errors="surrogateescape")) > 255:
                raise ArchiveError(f"archive name component too long: {part[:40]}...")
    name = "/".join(parts)
    if size > 4000 and len(name.encode(errors="surrogateescape")) > 4000:
        raise ArchiveError(f"archive name too long: {name[:60]}...")
    return name


def _num(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    try:
        return int(field.rstrip(b" \0"), 8)  # octal digits, then NULs or spaces: most fields
    except ValueError:
        pass
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise ArchiveError(f"bad number in tar header: {field!r}") from exc


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse `LEN KEY=VALUE\\n` records; values stay bytes (xattrs are binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise ArchiveError("malformed pax header record")
        try:
            length = int(data[pos:sp])
        except ValueError as exc:
            raise ArchiveError("malformed pax header length") from exc
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError("pax header record overruns its header")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            raise ArchiveError("pax header record without '='")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return out


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


@runtime_checkable
class Lender(Protocol):
    """A stream that lends its blocks: what `view` returns is valid until the next call."""

    def view(self, n: int) -> memoryview: ...


class PaxReader:
    """Iterate members of a tar stream; read each member's data with `chunks()`."""

    def __init__(
        self,
        stream: BinaryIO | Lender,
        *,
        limit: int | None = None,
        chunk: int = 1 << 20,
        partial: bool = False,
    ) -> None:
        self._next: Callable[[int], bytes | memoryview] = (
            stream.view if isinstance(stream, Lender) else stream.read
        )
        self._partial = partial  # a chunk of an archive: may end at a member boundary
        self._chunk = chunk
        self._buf: bytes | memoryview = b""
        self._pos = 0
        self._left = 0  # data bytes of the current member not yet consumed
        self._pad = 0
        self._limit = limit  # a member may not claim more bytes than the whole archive
        self._global: dict[str, bytes] = {}

    def _fill(self, n: int) -> bytes:
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = bytes(self._buf[self._pos : self._pos + n])
            self._pos += n
            return out
        parts = [bytes(self._buf[self._pos :])]  # copied before the next read reuses it
        need = n - avail
        while need > 0:
            data = self._next(need)
            if not data:
                raise ArchiveError("archive is truncated")
            parts.append(bytes(data))
            need -= len(data)
        self._buf, self._pos = b"", 0
        return b"".join(parts)

    def _read_some(self, n: int) -> bytes | memoryview:
        """Up to `n` bytes (at least one), without joining buffers."""
        if self._pos >= len(self._buf):
            self._buf = self._next(self._chunk)
            self._pos = 0
            if not self._buf:
                raise ArchiveError("archive is truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _at_end(self) -> bool:
        if self._pos < len(self._buf):
            return False
        self._buf, self._pos = self._next(self._chunk), 0
        return not self._buf

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The current member's remaining data. Each chunk may be a view of a read-ahead
        block: use it before asking for the next one, or copy it."""
        while self._left > 0:
            data = self._read_some(self._left)
            self._left -= len(data)
            yield data
        if self._pad:
            self._fill(self._pad)
            self._pad = 0

    def read_all(self) -> bytes:
        return b"".join([bytes(chunk) for chunk in self.chunks()])

    def _skip(self) -> None:
        for _ in self.chunks():
            pass

    def drain(self) -> None:
        """Consume the rest of the stream (so the caller can verify its hash)."""
        self._skip()
        while self._next(self._chunk):
            pass

    def _start_data(self, size: int) -> None:
        if size < 0 or (self._limit is not None and size > self._limit):
            raise ArchiveError(f"member claims {size} bytes, more than the archive holds")
        self._left = size
        self._pad = -size % BLOCK

    def _header_data(self, size: int) -> bytes:
        if size > MAX_HEADER:
            raise ArchiveError(f"extended header of {size} bytes refused")
        self._start_data(size)
        return self.read_all()

    def __iter__(self) -> Iterator[Member]:
        pax: dict[str, bytes] = {}
        longname: str | None = None
        longlink: str | None = None
        while True:
            if self._left or self._pad:
                self._skip()
            if self._partial and self._at_end():
                return
            block = self._fill(BLOCK)
            if block == bytes(BLOCK):
                return
            if sum(block) - sum(block[148:156]) + 8 * 32 != _num(block[148:156]):
                raise ArchiveError("tar header checksum mismatch")
            typeflag = block[156:157]
            size = _num(block[124:136])
            if typeflag == b"x":
                pax = parse_pax(self._header_data(size))
                continue
            if typeflag == b"g":
                self._global.update(parse_pax(self._header_data(size)))
                continue
            if typeflag in (b"L", b"K"):
                text = _text(self._header_data(size).rstrip(b"\0"))
                if typeflag == b"L":
                    longname = text
                else:
                    longlink = text
                continue
            if typeflag not in KINDS:
                raise ArchiveError(f"unsupported tar member type {typeflag!r}")
            yield self._member(
                block, typeflag, size, {**self._global, **pax} if self._global else pax, longname, longlink
            )
            pax, longname, longlink = {}, None, None

    def _member(
        self,
        block: bytes,
        typeflag: bytes,
        size: int,
        pax: dict[str, bytes],
        longname: str | None,
        longlink: str | None,
    ) -> Member:
        kind = KINDS[typeflag]
        name = _text(block[0:100].split(b"\0", 1)[0])
        prefix = _text(block[345:500].split(b"\0", 1)[0]) if block[257:262] == b"ustar" else ""
        if prefix:
            name = prefix + "/" + name
        name = longname or name
        link = longlink or _text(block[157:257].split(b"\0", 1)[0])
        if "path" in pax:
            name = _text(pax["path"])
        if "linkpath" in pax:
            link = _text(pax["linkpath"])
        if "size" in pax:
            size = _int(pax["size"])
        sparse = None
        realsize = 0
        if pax.get("GNU.sparse.major") == b"1":
            name = _text(pax.get("GNU.sparse.name", name.encode("utf-8", "surrogateescape")))
            realsize = _int(pax.get("GNU.sparse.realsize", b"0"))
        elif "GNU.sparse.map" in pax or "GNU.sparse.offset" in pax:
            raise ArchiveError(f"old GNU sparse format (0.x) is not supported: {name}")
        mtime = pax.get("mtime")
        mtime_ns = _mtime_ns(mtime) if mtime else _num(block[136:148]) * 10**9
        xattrs, acls = _schily(pax)
        if kind == "dir":
            size = 0  # GNU tar never stores data for a directory
        self._start_data(size)
        if realsize:
            if realsize > MAX_REALSIZE:
                raise ArchiveError(f"sparse member {name} claims {realsize} bytes")
            sparse, used = self._sparse_map(realsize)
            self._left -= used
        uid = _int(pax["uid"]) if "uid" in pax else _num(block[108:116])
        gid = _int(pax["gid"]) if "gid" in pax else _num(block[116:124])
        major, minor = _num(block[329:337]), _num(block[337:345])
        # Values the kernel cannot take would surface as OverflowError/ValueError from
        # os.chown, os.utime, os.makedev or os.symlink: refuse them here, as hostile.
        # (Plain comparisons, not all() over a generator: this runs once per file.)
        if not (
            0 <= uid < _ID_LIMIT
            and 0 <= gid < _ID_LIMIT
            and 0 <= major < _ID_LIMIT
            and 0 <= minor < _ID_LIMIT
            and -_NS_LIMIT < mtime_ns < _NS_LIMIT
        ):
            raise ArchiveError(f"member {name[:60]!r} has an owner, device or mtime out of range")
        if "\0" in link or (xattrs and any("\0" in k for k, _ in xattrs)):
            raise ArchiveError(f"member {name[:60]!r} has a NUL byte in its link target or an xattr name")
        if kind == "symlink" and not link:  # Linux makes none: symlink("") is ENOENT
            raise ArchiveError(f"symlink {name[:60]!r} has no target")
        return Member(
            name=safe_name(name),
            kind=kind,
            mode=_num(block[100:108]) & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=mtime_ns,
            size=size,
            linkname=safe_name(link) if kind == "hardlink" else link,
            rdev=(major, minor),
            xattrs=xattrs,
            acls=acls,
            sparse=sparse,
            realsize=realsize,
        )

    def _sparse_map(self, realsize: int) -> tuple[tuple[tuple[int, int], ...], int]:
        """GNU sparse 1.0: decimal lines at the start of the data, padded to a block."""
        text = b""
        used = 0
        try:
            while text.count(b"\n") < 1 or text.count(b"\n") < 1 + 2 * int(text.split(b"\n", 1)[0] or 0):
                if used >= MAX_HEADER or self._left - used < BLOCK:
                    raise ArchiveError("sparse map overruns its member")
                text += self._fill(BLOCK)
                used += BLOCK
            count = int(text.split(b"\n", 1)[0])
            if count < 0:
                raise ValueError(count)
            fields = [int(x) for x in text.split(b"\n")[: 1 + 2 * count]]
            pairs = tuple(zip(fields[1::2], fields[2::2], strict=True))
        except ValueError as exc:  # not decimal numbers, or a negative count
            raise ArchiveError("malformed sparse map") from exc
        end = 0
        for off, length in pairs:
            if off < end or off + length > realsize or length < 0:
                raise ArchiveError("sparse map is out of order or out of bounds")
            end = off + length
        return pairs, used


def _schily(pax: dict[str, bytes]) -> tuple[tuple[tuple[str, bytes], ...], tuple[tuple[str, str], ...]]:
    """The xattrs and ACLs of a member's pax records, each sorted by name (one pass).

    An ACL is kept as text only where the member has no `system.posix_acl_*` xattr for
    it: GNU tar with `--acls` wrote both, the text naming users by the capturing host's
    names (see tarstream.py), and the xattr, with the ids, is the one that is right."""
    if not pax:
        return (), ()
    xattrs, acls = [], []
    for k, v in pax.items():
        if not k.startswith("SCHILY."):
            continue
        if k.startswith("SCHILY.xattr."):
            xattrs.append((k[13:], v))
        elif k in ("SCHILY.acl.access", "SCHILY.acl.default"):
            acls.append((k[11:], _text(v)))
    if acls:
        acls = [(which, text) for which, text in acls if f"SCHILY.xattr.system.posix_acl_{which}" not in pax]
    return tuple(sorted(xattrs)), tuple(sorted(acls))


def _int(value: bytes) -> int:
    try:
        n = int(value)
    except ValueError as exc:
        raise ArchiveError(f"bad number in pax header: {value!r}") from exc
    if n < 0:
        raise ArchiveError(f"negative number in pax header: {value!r}")
    return n


def _mtime_ns(value: bytes) -> int:
    sec, _, frac = value.decode("ascii", "replace").partition(".")
    try:
        return int(sec) * 10**9 + int((frac + "000000000")[:9])
    except ValueError as exc:
        raise ArchiveError(f"bad mtime in pax header: {value!r}") from exc


def parent_of(name: str) -> str:
    return posixpath.dirname(name)
