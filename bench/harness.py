"""Measuring: wall time and peak RSS of commands, repeated runs, medians, reports."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bootenv.writeback import Flusher

TIME = "/usr/bin/time"  # GNU time (Debian package `time`)


@dataclass(frozen=True)
class Sample:
    seconds: float
    max_rss_kb: int
    cpu: float = 0.0  # user + system seconds of the command and its children
    # With measure(tree=True): the peak of the shared memory the command's own processes
    # hold (memfds, /dev/shm files, shared anonymous mappings: shared_memory_kb).
    shmem_kb: int = 0
    busy: float = 0.0  # CPU seconds the whole machine spent meanwhile (every process, the kernel)
    # With measure(tree=True): the command's whole footprint, estimated: the peak of its
    # processes' summed PSS (pages they share counted once; shared memory left out) plus
    # the peak of their shared memory (shmem_kb), and never less than the largest
    # process's RSS.
    total_kb: int = 0


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    runs: int

    @staticmethod
    def of(values: Sequence[float]) -> Stats:
        return Stats(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Result:
    """One benchmark: named measurements, the ratio that matters, and its target."""

    name: str
    what: str
    measurements: dict[str, Stats] = field(default_factory=dict)
    ratio: float | None = None
    ratio_label: str = ""
    target: str = ""
    passed: bool | None = None
    notes: list[str] = field(default_factory=list)


def measure(
    argv: Sequence[str],
    *,
    shell: bool = False,
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
    tree: bool = False,
) -> Sample:
    """Run a command once; return its wall time, peak RSS (of the process tree's largest)
    and CPU time. Its output is discarded, or written to `stdout`.

    The command runs under GNU time, not straight from this process: a child forked from
    Python and then exec'd is charged the parent's resident pages as its peak RSS (the
    kernel keeps the high-water mark across exec), which would hide the command's own.
    With `tree`, the whole run's footprint is sampled too (Sample.shmem_kb and total_kb):
    it costs this process some CPU while the command runs, so only the memory benchmark
    asks for it.
    """
    cmd = ["sh", "-c", " ".join(argv)] if shell else list(argv)
    with (
        tempfile.NamedTemporaryFile(prefix="bench-time-") as report,
        open(stdout or os.devnull, "wb") as out,
        _MemoryPeak(tree=tree) as shmem,
    ):
        start, busy = time.monotonic(), machine_busy()
        proc = subprocess.Popen(
            [TIME, "-f", "%M %U %S", "-o", report.name, *cmd], stdout=out, stderr=subprocess.PIPE, env=env
        )
        shmem.follow(proc.pid)
        _, err_bytes = proc.communicate()
        elapsed, busy = time.monotonic() - start, machine_busy() - busy
        fields = Path(report.name).read_text().split("\n")
    if proc.returncode != 0:
        err = err_bytes.decode(errors="replace")
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {err[-500:]}")
    rss, user, system = [line for line in fields if line.strip()][-1].split()
    # Never under the largest process's peak RSS, which a sample can miss (that RSS holds
    # any shared memory the process maps, so it is not added to the shared peak again).
    total = max(shmem.total_kb, int(rss)) if tree else 0
    return Sample(elapsed, int(rss), float(user) + float(system), shmem.peak_kb, busy, total)


def machine_busy() -> float:
    """CPU seconds the machine has spent busy since boot, on all its cores (/proc/stat):
    user, system and interrupts, so kernel threads (writeback, the loop device's I/O) and
    the benchmark's own HTTP server count too, which a command's CPU time leaves out. Idle,
    iowait and steal (time the hypervisor gave to other guests) are not busy."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class _MemoryPeak:
    """With `tree`, sampled while a command runs, once `follow` names its process: the
    peak of the shared memory its descendants hold (shared_memory_kb, every 5 ms), which
    their RSS does not show, and the peak of their summed PSS without it (every 20 ms);
    `total_kb` is the two peaks added, the whole run's footprint, estimated (GNU time's
    %M is one process's). Only the command's own processes count: another process's
    memfds or tmpfs files, on the same machine meanwhile, are not charged to it. Samples
    can miss a short peak. Without `tree`, nothing is sampled."""

    def __init__(self, *, tree: bool = False) -> None:
        self.peak_kb = 0
        self.total_kb = 0
        self._tree = tree
        self._pid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _MemoryPeak:
        if self._tree:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._tree:
            self._thread.join()

    def follow(self, pid: int) -> None:
        """Count the processes under `pid` (GNU time's: its own few pages are left out)."""
        self._pid = pid

    def _run(self) -> None:
        pss, tick, pids = 0, 0, []
        while not self._stop.wait(0.005):
            if not self._pid:
                continue
            if tick % 4 == 0:  # finding the processes and reading their PSS costs more
                pids = descendants(self._pid)
                pss = max(pss, sum(map(_pss_kb, pids)))
            tick += 1
            self.peak_kb = max(self.peak_kb, shared_memory_kb(pids))
            self.total_kb = pss + self.peak_kb


def cpu_facts() -> dict[str, object]:
    """What makes one machine's ratios differ from another's, beside its disk: the CPU, and
    whether it has SHA instructions. bootenv hashes every byte it captures or lays out
    (sha256, against the signed manifest) and tar | zstd does not; without them (no
    `sha_ni` in /proc/cpuinfo) sha256 ran at 175-400 MB/s on the twenty-second session's
    machine, a third of a capture's CPU. Measured here on 64 MiB, best of three."""
    import hashlib

    model, flags = "?", set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    data = os.urandom(1 << 20) * 64
    best = min(_timed(lambda: hashlib.sha256(data).digest()) for _ in range(3))
    return {"cpu_model": model, "sha_ni": "sha_ni" in flags, "sha256_mb_s": round(len(data) / best / 1e6)}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (not `pid` itself), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The name in parentheses may hold spaces: the fields after its last ")".
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kb(pid: int) -> int:
    """A process's PSS without its shared memory (memfds, shared mappings), which
    shared_memory_kb counts."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0  # gone meanwhile, or a kernel thread
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    kb = {k: int(v.split()[0]) for k, v in fields.items() if k in ("Pss", "Pss_Shmem")}
    return kb.get("Pss", 0) - kb.get("Pss_Shmem", 0)


# What shared memory looks like in /proc/PID/fd and /proc/PID/maps: a memfd (bootenv's
# chunks waiting to be verified), a POSIX shm file, a shared anonymous mapping (write-os's
# aligned buffers), a System V segment.
SHARED_MEMORY = ("/memfd:", "/dev/shm/", "/dev/zero (deleted)", "/SYSV")


def shared_memory_kb(pids: Sequence[int]) -> int:
    """The shared memory held by the processes `pids`: every memfd, /dev/shm file and
    shared anonymous mapping one of them has open or mapped, counted once however many
    hold it (by device and inode), at the size of the pages it has (fstat's blocks)."""
    held: dict[tuple[int, int], int] = {}
    for pid in pids:
        for key, kb in _shared_objects(pid):
            held[key] = max(held.get(key, 0), kb)
    return sum(held.values())


def _shared_objects(pid: int) -> list[tuple[tuple[int, int], int]]:
    """(device, inode) and KiB of each shared memory object `pid` has open or mapped."""
    out: list[tuple[tuple[int, int], int]] = []
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return out  # gone meanwhile
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}").startswith(SHARED_MEMORY):
                st = os.stat(f"{fds}/{name}")
                out.append(((st.st_dev, st.st_ino), st.st_blocks // 2))
        except OSError:
            continue  # closed meanwhile
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return out
    resident: dict[str, int] | None = None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # range, perms, offset, dev, inode, path
        if len(fields) < 6 or not fields[5].startswith(SHARED_MEMORY):
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        key = (os.makedev(major, minor), int(fields[4]))
        try:
            out.append((key, os.stat(f"/proc/{pid}/map_files/{fields[0]}").st_blocks // 2))
        except PermissionError:  # map_files is root's: the pages this mapping has in memory
            if resident is None:
                resident = _resident_kb(pid)
            out.append((key, resident.get(fields[0], 0)))
        except OSError:
            continue  # unmapped meanwhile
    return out


def _resident_kb(pid: int) -> dict[str, int]:
    """Each mapping's Rss (/proc/PID/smaps), by its address range."""
    out: dict[str, int] = {}
    where = ""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            where = head
        elif head == "Rss:":
            out[where] = int(line.split()[1])
    return out


def repeat(
    runs: int, prepare: Callable[[], None], argv: Sequence[str], *, shell: bool = False, tree: bool = False
) -> list[Sample]:
    samples = []
    for _ in range(runs):
        prepare()
        samples.append(measure(argv, shell=shell, tree=tree))
    return samples


def seconds(samples: Sequence[Sample]) -> Stats:
    return Stats.of([s.seconds for s in samples])


@contextlib.contextmanager
def fresh_ext4(image: Path, mountpoint: Path, size: int = 32 << 30) -> Iterator[Path]:
    """A new, empty ext4 filesystem (on a sparse file), mounted at `mountpoint`.

    Every benchmark writes what it lays out or streams onto a filesystem of its own, the
    same for bootenv and its baseline: the shared disk's filesystem ages with the day's
    churn (measured: tar -x of 10 000 small files took 4-8 s of kernel time there, and
    0.4 s on a fresh ext4 on the same disk), which would skew every ratio.

    The loop device does direct I/O to its file (4 KiB sectors), so a write that is
    direct or synced here is on the disk, as on a real target: through the host's page
    cache, `dd oflag=direct` would be done long before the data is. Inode tables are not
    zeroed in the background (noinit_itable): that would compete with the runs.
    """
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        with direct_loop(image) as loop:
            subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
            with mounted(loop, mountpoint, "noinit_itable"):
                yield mountpoint
    finally:
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def direct_loop(image: Path) -> Iterator[str]:
    """`image` behind a loop device that does direct I/O to it, with 4 KiB sectors: what
    is written to the device lands in one page cache, the writer's own, as on a disk."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path, *options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", *(["-o", ",".join(options)] if options else []), device, str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def durable_write(directory: Path, size: int) -> float:
    """Seconds to write `size` bytes of incompressible data as one file in `directory`,
    in 4 MiB writes, and make them durable: the disk's floor for that many bytes, which
    no layout of them, on any number of streams, gets below. bootenv's flusher syncs the
    file as it is written, as write-os has it do: with only the final fsync, the disk's
    cache flush (here, the host committing what its file allocated) would all come at
    the end, after the writes, and the floor would be too high."""
    block = os.urandom(4 << 20)
    path = directory / "durable-write"
    start = time.monotonic()
    with open(path, "wb", buffering=0) as f:
        with Flusher(f"/proc/self/fd/{f.fileno()}"):
            for offset in range(0, size, len(block)):
                f.write(block[: size - offset])
        os.fsync(f.fileno())
    seconds = time.monotonic() - start
    path.unlink()
    return seconds


def drop_caches(trim: Path | None = None) -> None:
    """Start each run cold, so runs are comparable (needs root; best effort).

    With `trim`, a path on a `fresh_ext4` filesystem, the blocks freed by the last run are
    first given back to the disk: the loop device's sparse file would otherwise keep every
    block ever written (measured: the memory benchmark alone writes over 40 GB).
    """
    os.sync()
    if trim is not None:
        with contextlib.suppress(OSError):  # no fstrim: the sparse file just grows
            subprocess.run(["fstrim", str(trim)], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def table(results: Sequence[Result]) -> str:
    rows = [["benchmark", "measurement", "median", "min", "max", "ratio", "target", "ok"]]
    for r in results:
        first = True
        for key, st in r.measurements.items():
            rows.append(
                [
                    r.name if first else "",
                    key,
                    f"{st.median:.3f}",
                    f"{st.min:.3f}",
                    f"{st.max:.3f}",
                    f"{r.ratio:.2f} {r.ratio_label}" if first and r.ratio is not None else "",
                    r.target if first else "",
                    ("yes" if r.passed else "NO") if first and r.passed is not None else "",
                ]
            )
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    for r in results:
        for note in r.notes:
            out.append(f"* {r.name}: {note}")
    return "\n".join(out)


def save(results: Sequence[Result], directory: Path, meta: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = directory / f"bench-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    (directory / "latest.json").write_text(path.read_text())
    return path


def chart(results: Sequence[Result], path: Path) -> Path | None:
    """A bar chart of the ratios against their targets (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return None
    shown = [r for r in results if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(shown) + 1.5))
    names = [f"{r.name}\n{r.ratio_label}" for r in shown]
    colors = ["tab:gray" if r.passed is None else "tab:green" if r.passed else "tab:red" for r in shown]
    ax.barh(names, [r.ratio or 0 for r in shown], color=colors)
    for i, r in enumerate(shown):
        ax.text((r.ratio or 0) + 0.02, i, f"{r.ratio:.2f}  (target {r.target})", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1.9 * max([1.0, *(r.ratio or 0 for r in shown)]))  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("ratio (measured side by side in one run)")
    ax.set_title("bootenv benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
