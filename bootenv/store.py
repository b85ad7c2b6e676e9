"""Content-addressed blobs: written to a temp file, renamed to `<sha256>.<suffix>`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

from bootenv.manifest import Blob
from bootenv.writeback import start_writeback

WRITEBACK_EVERY = 8 << 20  # start the disk on what was written, every this many bytes


class BlobWriter:
    """A file-like sink that hashes what it is given and names the result by its hash.

    The data is written back as it comes (writeback.py), so the fsync in `finish` waits
    for the last few MiB only, not for the whole blob.
    """

    def __init__(self, directory: Path, suffix: str) -> None:
        self.directory = directory
        self.suffix = suffix
        fd, name = tempfile.mkstemp(dir=directory, prefix=".partial-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._queued = 0  # bytes whose writeback was started
        self.blob: Blob | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        n = self._file.write(data)
        if self.size - self._queued >= WRITEBACK_EVERY:
            self._file.flush()
            start_writeback(self._file.fileno(), self._queued, self.size - self._queued)
            self._queued = self.size
        return n

    def flush(self) -> None:
        self._file.flush()

    def finish(self, raw_size: int) -> Blob:
        """Close, fsync and rename into place; return the pinned blob."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hash.hexdigest()
        name = f"{digest}.{self.suffix}"
        os.replace(self._tmp, self.directory / name)
        self.blob = Blob(file=name, sha256=digest, size=self.size, raw_size=raw_size)
        return self.blob

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.blob is None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def write_blob(directory: Path, suffix: str, data: bytes) -> Blob:
    with BlobWriter(directory, suffix) as out:
        out.write(data)
        return out.finish(len(data))
