"""Start writing to the disk now, so the final fsync or syncfs has little left to wait for.

sync_file_range(SYNC_FILE_RANGE_WRITE) queues a file's writeback and returns, so the disk
works while the caller goes on (dpkg does the same for each file it unpacks). `Flusher`
syncs a whole filesystem now and then on a thread of its own, while files are being
made. Both are advice about timing only: they never replace the final fsync/syncfs.

The writers here put a file in place whole or not at all: `new_file` makes the temp file
that every such write starts with (replace_at, a signature, a key, the ramdisk's files);
`replace_dir` puts several files in place at once (build-ramdisk's kernel and initramfs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

from bootenv.xattrs import LABELS

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
_RENAME_EXCHANGE = 2  # linux/fs.h
# What renameat2 says where the filesystem cannot swap two names (NFS) or the kernel or
# C library has no renameat2.
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
FLUSH_INTERVAL = 0.1  # seconds between a Flusher's syncs


@functools.cache
def _sync_file_range() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Queue the writeback of `nbytes` at `offset` (0: to the end of the file)."""
    _sync_file_range()(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _libc_syncfs() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).syncfs
    fn.argtypes = (ctypes.c_int,)
    return fn


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data`: a short write (a full disk) goes on, or raises."""
    n = os.write(fd, data)
    if n == len(data):
        return  # the common case: no view of the data to make
    view = memoryview(data)[n:]
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_durably(path: Path, data: bytes) -> None:
    """Write `path` whole and fsync it (its name is the caller's: a rename, fsync_dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def new_file(path: str | Path, mode: int, *, dir_fd: int | None = None, sync: bool = True) -> Iterator[int]:
    """A new file at `path` (in the directory `dir_fd`, if given) for the block to fill
    through the descriptor it yields: created with `mode` (less the umask), fsynced when
    the block ends (unless not `sync`: the caller syncs the filesystem once for several),
    and removed again if the block or the fsync fails. A file a killed run left at `path`
    is removed first, never opened: it may be a hard link to a file that must not
    change, or a symlink. Naming the file (a rename, then fsync_dir) is the caller's."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path, dir_fd=dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        yield fd
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)


def replace_at(
    dfd: int,
    name: str,
    data: bytes,
    *,
    like: os.stat_result | None,
    tmp: str,
    sync: bool = True,
    xattrs: Mapping[str, bytes] | None = None,
) -> None:
    """Put `data` in place of `name` in the directory `dfd`, whole or not at all: written
    to `tmp` in the same directory (`new_file`: one a killed run left is removed, never
    opened), given `like`'s owner (when root) and mode, and if `xattrs` is given exactly
    those (an ACL it took from a default ACL of its directory dropped, the label the
    security policy gave it kept), fsynced (unless not `sync`: the caller syncs the
    filesystem once for several), then renamed over `name`. Making the rename durable
    (fsync of the directory) is the caller's."""
    with new_file(tmp, 0o644 if like is None else 0o600, dir_fd=dfd, sync=sync) as fd:
        if xattrs is not None:
            for key in set(os.listxattr(fd)) - set(xattrs) - LABELS:
                os.removexattr(fd, key)
        write_all(fd, data)
        if like is not None:
            if os.geteuid() == 0:
                os.fchown(fd, like.st_uid, like.st_gid)
            os.fchmod(fd, stat.S_IMODE(like.st_mode))
        for key, value in (xattrs or {}).items():  # after the owner: a chown drops a file capability
            os.setxattr(fd, key, value)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename or a new file in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(fd: int) -> None:
    """syncfs(2) of the filesystem `fd` is on; OSError if it reports a write error."""
    if _libc_syncfs()(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def _libc_renameat2() -> ctypes._NamedFuncPointer:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return fn


def exchange_at(dfd: int, a: str, b: str) -> None:
    """Swap the entries `a` and `b` of the directory `dfd` in one step (renameat2 with
    RENAME_EXCHANGE): each name always leads to one of the two, even across a crash."""
    try:
        fn = _libc_renameat2()
    except AttributeError:  # a C library older than glibc 2.28
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS)) from None
    if fn(dfd, os.fsencode(a), dfd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def replace_dir(final: Path, mode: int | None = None) -> Iterator[Path]:
    """A new, empty directory for the block to fill, put in place of the directory `final`
    (made if missing) in one step when the block ends, and removed if the block fails: a
    reader of `final`, or a power cut at any point, finds the old directory's files or
    the new one's, never some of each. The block's files must be fsynced (`new_file`).

    The new directory is made beside `final` as `.NAME.new`, fsynced, given `final`'s
    mode and owner (when root), and swapped with it (`exchange_at`); the parent is
    fsynced and the old directory, now `.NAME.new`, removed (`mode`, if given, is the
    new directory's instead of `final`'s). Where the filesystem cannot
    swap (NFS), `final` is renamed to `.NAME.old` and the new one to `final`: between the
    two renames, and after a power cut there, there is no `final` at all (never a mix),
    and the next run puts `.NAME.old` back before it starts. A symlink at `final` is
    kept: the directory it leads to is replaced. One run at a time per parent directory
    (flock of the parent)."""
    final = final.resolve()
    parent, name = final.parent, final.name
    new, old = f".{name}.new", f".{name}.old"
    parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        if os.path.lexists(parent / old):  # a run that could not swap, cut short
            if os.path.lexists(final):
                _remove(parent / old)
            else:
                os.rename(old, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # between its renames
        _remove(parent / new)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, dir_fd=dfd)
        os.mkdir(new, 0o700, dir_fd=dfd)
        try:
            yield parent / new
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if os.geteuid() == 0:
                os.chown(new, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(new, stat.S_IMODE(st.st_mode) if mode is None else mode, dir_fd=dfd)
            fsync_dir(parent / new)
            _swap(dfd, new, name, old)
            os.fsync(dfd)
            _remove(parent / old)
        finally:
            _remove(parent / new)  # the block's, unfinished; or the old one, swapped out
    finally:
        os.close(dfd)


def _swap(dfd: int, new: str, name: str, old: str) -> None:
    """`new` takes `name`'s place, in one step where the filesystem can (replace_dir)."""
    try:
        exchange_at(dfd, new, name)
        return
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
        log.debug("cannot swap %s and %s in one step (%s): renaming them in turn", new, name, exc)
    os.rename(name, old, src_dir_fd=dfd, dst_dir_fd=dfd)
    try:
        os.rename(new, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        os.rename(old, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        raise


def _remove(path: Path) -> None:
    """Remove a directory tree or anything else at `path`, never following a symlink."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


class Flusher:
    """Sync `path` every `interval` seconds (FLUSH_INTERVAL), until closed: its whole
    filesystem (a directory), or the file or device itself.

    Queued writeback is not the end of a flush: a sync also commits the filesystem's
    journal and has the disk flush its cache. Where the disk is a file of the host's (a
    VM's disk, or the benchmarks' loop device), that flush makes the host commit every
    block allocated since the last one, and at the end of a layout of mysql it took
    0.45 s with the disk otherwise idle (measured: sectors written per 50 ms). Synced as
    it goes, the final sync finds little left. The thread spends its time in the
    syscall, without the GIL.

    The kernel reports a write error once to each file description open when it happened,
    and not to one opened after someone saw it. The flusher syncs through a description
    of its own, opened here: an owner whose description is older (write-os's target)
    still sees the error at its final sync; an owner that opens a new one later (a
    layout's syncfs, in another process) must ask `check()`.
    """

    def __init__(self, path: Path | str, interval: float | None = None) -> None:
        self.path = str(path)
        self.error: OSError | None = None
        self._interval = FLUSH_INTERVAL if interval is None else interval
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sync at a time: the thread's, or check()'s
        self._thread: threading.Thread | None = None
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            whole = stat.S_ISDIR(os.fstat(self._fd).st_mode)
            self._sync: Callable[[int], None] = sync_filesystem if whole else os.fdatasync
            self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
            self._thread.start()
        except (OSError, RuntimeError) as exc:  # advice only: the final sync still comes
            log.debug("not syncing %s as it is written: %s", path, exc)
            self._thread = None
            self._close_fd()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sync_once()

    def _sync_once(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._sync(self._fd)
            except OSError as exc:
                if self.error is None:
                    self.error = exc
                    log.debug("syncing %s failed: %s", self.path, exc)

    def check(self) -> None:
        """Sync once more, now, and raise the first write error any sync reported. The
        flusher's description was opened before anything it guards was written, so this
        sync is told of every error since, whoever else was told first."""
        self._sync_once()
        if self.error is not None:
            raise OSError(self.error.errno, f"writing to {self.path} failed: {self.error.strerror}")

    def close(self) -> None:
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> Flusher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
