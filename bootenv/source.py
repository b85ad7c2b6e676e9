"""Where a composite image lives: a local directory or an HTTP(S) URL.

HTTP reads resume with Range requests after a dropped connection, with bounded
retries and exponential backoff (httpreader.py). A reader never holds more than one
chunk in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Protocol

from bootenv.errors import UserError
from bootenv.httpreader import CHUNK, HttpReader, MissingError, RetryPolicy
from bootenv.httpsession import new_session
from bootenv.manifest import MANIFEST, MAX_MANIFEST, Manifest, ManifestError, parse_manifest
from bootenv.smallfile import read_capped
from bootenv.urls import split_http_url


class TooLargeError(UserError):
    """A file read whole (the manifest, its signature) is larger than its cap."""


class Source(Protocol):
    def read_bytes(self, name: str, limit: int) -> bytes:
        """The whole file `name`, if it holds at most `limit` bytes (else TooLargeError,
        once at most about `limit` bytes were read)."""
        ...

    def open(self, name: str, size: int, offset: int | None = None) -> BinaryIO:
        """A reader of the whole blob `name` (`size` bytes), or of the window of `size`
        bytes at `offset` (a chunk)."""
        ...

    def describe(self, name: str) -> str: ...


class DirSource:
    def __init__(self, path: Path) -> None:
        if not (path / MANIFEST).is_file():
            raise UserError(f"{path} is not a composite image (no {MANIFEST})")
        self.path = path

    def read_bytes(self, name: str, limit: int) -> bytes:
        path = self.path / name
        try:
            data = read_capped(path, limit)
        except FileNotFoundError as exc:
            raise MissingError(f"{path} is missing from the image") from exc
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from exc
        if len(data) > limit:
            raise TooLargeError(f"{path} is larger than {limit} bytes")
        return data

    def open(self, name: str, size: int, offset: int | None = None) -> BinaryIO:
        try:
            f = open(self.path / name, "rb")
        except FileNotFoundError as exc:
            raise MissingError(f"{self.path / name} is missing from the image") from exc
        except OSError as exc:  # a directory where a blob should be, a permission
            raise UserError(f"cannot read {self.path / name}: {exc.strerror}") from exc
        if offset is None:
            return f  # the whole file: trailing bytes still reach the hash check
        f.seek(offset)
        return _Window(f, size)  # type: ignore[return-value]

    def describe(self, name: str) -> str:
        return str(self.path / name)


class HttpSource:
    def __init__(self, url: str, policy: RetryPolicy | None = None) -> None:
        self.base = url.rstrip("/") + "/"
        self.policy = policy or RetryPolicy()
        self.session = new_session()
        # The blobs are already compressed; a transparently gzipped answer would make
        # byte offsets (Range) and Content-Length meaningless.
        self.session.headers["Accept-Encoding"] = "identity"

    def read_bytes(self, name: str, limit: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        with HttpReader(self.session, self.base + name, None, self.policy) as r:
            while got <= limit:
                # The server's length, once it answered, is refused at once if over.
                if r.size is not None and r.size > limit:
                    got = r.size
                    break
                chunk = r.read(min(CHUNK, limit + 1 - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        if got > limit:
            raise TooLargeError(f"{self.base + name} is larger than {limit} bytes")
        return b"".join(parts)

    def open(self, name: str, size: int, offset: int | None = None) -> BinaryIO:
        reader = HttpReader(self.session, self.base + name, size, self.policy, start=offset)
        return reader  # type: ignore[return-value]

    def describe(self, name: str) -> str:
        return self.base + name


class _Window:
    """At most `size` bytes of an open file, from where it is positioned."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Window:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(location: str) -> Source:
    if location.startswith(("http://", "https://")):
        if split_http_url(location) is None:
            raise UserError(f"{location} is not a valid URL", hint="http(s)://HOST[:PORT]/PATH")
        return HttpSource(location)
    path = Path(location)
    if not path.is_dir():
        raise UserError(f"{location} is neither a directory nor an http(s) URL")
    return DirSource(path)


def read_manifest(source: Source) -> bytes:
    """The image's manifest, as it is (no bigger than MAX_MANIFEST)."""
    try:
        return source.read_bytes(MANIFEST, MAX_MANIFEST)
    except TooLargeError as exc:
        raise ManifestError(f"{source.describe(MANIFEST)} is larger than {MAX_MANIFEST >> 20} MiB") from exc


def read_manifest_file(path: Path) -> bytes:
    """A manifest file's bytes (no bigger than MAX_MANIFEST). FileNotFoundError if there
    is none; UserError if it cannot be read, is not a regular file, or is too large."""
    try:
        data = read_capped(path, MAX_MANIFEST)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_MANIFEST:
        raise ManifestError(f"{path} is larger than {MAX_MANIFEST >> 20} MiB")
    return data


def load_manifest(location: str) -> Manifest:
    return parse_manifest(read_manifest(open_source(location)))
