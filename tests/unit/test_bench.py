"""Smoke tests of the benchmark harness and the synthetic gold tree on tiny inputs (no timings)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import zstandard

from bench import harness
from bench.harness import Result, Sample, Stats, durable_write, measure, save, table
from bench.scenarios import Env, fetch_units, rows, stream_bound
from bench.synthetic import Plan, SyntheticSpec, make_pool, plan, status_text, synthetic_tree
from bench.throttle import serve
from bootenv.assign import plan_split
from bootenv.dpkg import INFO, Database, parse_script_paths, parse_status, read_database
from bootenv.exclude import Exclusions
from bootenv.manifest import Blob, Chunk, Component
from bootenv.split import Split, parse_component_arg
from bootenv.walk import Entry, Kind, scan
from tests.unit.nodelay import connection_options


def test_measure_counts_the_whole_process_tree_and_its_memfds(allow_run: None) -> None:
    """Two processes holding 20 MiB each and a memfd of 24 MiB: the whole run's footprint
    counts all three, where GNU time's peak RSS is one process's."""
    code = (
        "import os, time; fd = os.memfd_create('x'); os.write(fd, bytes(24 << 20)); "
        "pid = os.fork(); x = bytearray(os.urandom(20 << 20)); time.sleep(0.5); "
        "pid and os.waitpid(pid, 0)"
    )
    sample = measure([sys.executable, "-c", f'"{code}"'], shell=True, tree=True)
    assert sample.total_kb >= (2 * 20 + 24) << 10
    assert sample.max_rss_kb < sample.total_kb - (20 << 10)
    assert measure([sys.executable, "-c", f'"{code}"'], shell=True).total_kb == 0  # not asked: not sampled


def test_shared_memory_a_process_maps_is_counted_once(allow_run: None) -> None:
    """A shared anonymous mapping (write-os's aligned buffers) is Shmem and PSS at once."""
    code = "import mmap, time; m = mmap.mmap(-1, 32 << 20); m.write(bytes(32 << 20)); time.sleep(0.5)"
    sample = measure([sys.executable, "-c", f'"{code}"'], shell=True, tree=True)
    assert sample.shmem_kb >= 30 << 10 and sample.total_kb >= 32 << 10
    assert sample.total_kb < sample.shmem_kb + sample.max_rss_kb  # not 32 MiB twice over


def test_shared_memory_is_the_trees_own(allow_run: None) -> None:
    """A memfd open in two processes, another only mapped (its fd closed) and a shared
    anonymous mapping, each counted once at the pages it holds; a memfd that a process
    outside the measured tree holds meanwhile is not charged to the run."""
    import subprocess

    from bench.harness import descendants, shared_memory_kb

    code = (
        "import mmap, os, sys, time; fd = os.memfd_create('held'); os.write(fd, bytes(24 << 20)); "
        "m = os.memfd_create('mapped'); os.ftruncate(m, 64 << 20); mm = mmap.mmap(m, 64 << 20); "
        "os.close(m); mm.write(bytes(8 << 20)); anon = mmap.mmap(-1, 32 << 20); anon.write(bytes(4 << 20)); "
        # The child says ready, in one write: both processes then exist, memory in place.
        "pid = os.fork(); pid or os.write(1, b'ready\\n'); time.sleep(30); pid and os.waitpid(pid, 0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        tree = [proc.pid, *descendants(proc.pid)]
        assert len(tree) == 2
        assert shared_memory_kb(tree) == (24 + 8 + 4) << 10
        assert shared_memory_kb([proc.pid]) == (24 + 8 + 4) << 10  # the child shares the same
        small = "import os, time; fd = os.memfd_create('x'); os.write(fd, bytes(4 << 20)); time.sleep(0.3)"
        sample = measure([sys.executable, "-c", f'"{small}"'], shell=True, tree=True)
        assert 4 << 10 <= sample.shmem_kb < 8 << 10  # not the 36 MiB held outside the run
    finally:
        os.killpg(proc.pid, 9)  # the child too
        proc.wait()
        proc.stdout.close()


def test_measure_table_and_save(tmp_path: Path, allow_run: None) -> None:
    sample = measure([sys.executable, "-c", "x = bytearray(20 << 20)"])
    assert sample.seconds > 0 and sample.max_rss_kb > 20 << 10  # the child's own peak RSS
    held = "import os, time; fd = os.memfd_create('x'); os.write(fd, bytes(24 << 20)); time.sleep(0.3)"
    assert measure([sys.executable, "-c", f'"{held}"'], shell=True, tree=True).shmem_kb >= 20 << 10
    assert measure([sys.executable, "-c", f'"{held}"'], shell=True).shmem_kb == 0  # not asked: not sampled
    spin = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.4: pass')"
    burnt = measure([sys.executable, "-c", f'"{spin}"'], shell=True)
    assert burnt.cpu >= 0.35 and burnt.busy >= 0.8 * burnt.cpu  # the machine saw that CPU too
    r = Result("smoke", "a tiny run", {"python (s)": Stats.of([sample.seconds, sample.seconds * 2])})
    r.ratio, r.ratio_label, r.target, r.passed = 1.5, "x", ">= 1.0", True
    r.notes.append("a note")
    text = table([r])
    assert "smoke" in text and "1.50 x" in text and "* smoke: a note" in text
    path = save([r], tmp_path, {"runs": 2})
    doc = json.loads(path.read_text())
    assert doc["results"][0]["measurements"]["python (s)"]["runs"] == 2
    assert (tmp_path / "latest.json").read_text() == path.read_text()


def test_durable_write_syncs_exactly_the_bytes_asked_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(harness.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd)))
    size = (9 << 20) + 5  # not a whole number of its 4 MiB writes
    assert durable_write(tmp_path, size) > 0
    assert synced == [size]
    assert list(tmp_path.iterdir()) == []


def test_throttled_server_serves_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 1024
    (tmp_path / "blob").write_bytes(data)
    nodelay = connection_options(monkeypatch)
    with serve(tmp_path, per_connection=50e6, per_host=100e6) as url:
        assert requests.get(f"{url}/blob", timeout=10).content == data
        part = requests.get(f"{url}/blob", headers={"Range": "bytes=1000-"}, timeout=10)
        assert part.status_code == 206 and part.content == data[1000:]
        assert requests.get(f"{url}/../etc/passwd", timeout=10).status_code == 404
    # As nginx and `bootenv serve`: with Nagle's algorithm, each of a layout's range
    # requests waited for the client's delayed ACK (fetching mysql's chunks under the
    # 1 Gb/s cap ran at 46 MB/s, 119 MB/s without it).
    assert nodelay and all(nodelay), nodelay


def test_a_capped_piece_is_paid_for_before_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every piece waits for its own bytes, the first and the last of a response too, and
    time the connection sat idle is not saved up as a burst."""
    from bench import throttle

    clock = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])
    bucket = throttle.Bucket(1000.0)
    assert bucket.reserve(500) == 100.5  # the first piece is not free
    assert bucket.reserve(500) == 101.0  # nor the next, queued behind it
    clock[0] = 101.002  # that one was sent at its deadline, and took 2 ms
    assert bucket.reserve(100) == pytest.approx(101.1)  # no drift; the last one pays too
    clock[0] = 200.0
    assert bucket.reserve(1000) == 201.0 - throttle.SLACK  # idle time is no credit, beyond the slack
    assert throttle.Bucket(None).reserve(1 << 30) == 0.0  # no cap


def test_the_per_connection_cap_is_one_bucket_per_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All the requests a keep-alive connection carries share its cap (as a layout's
    stream sends its range requests on one connection); another connection has its own."""
    from bench import throttle

    charged: dict[int, list[int]] = {}

    class Counted(throttle.Bucket):
        def reserve(self, n: int) -> float:
            if self.rate == 50e6:
                charged.setdefault(id(self), []).append(n)
            return super().reserve(n)

    monkeypatch.setattr(throttle, "Bucket", Counted)
    data = os.urandom(200 << 10)  # four pieces, the last one short
    (tmp_path / "blob").write_bytes(data)
    with serve(tmp_path, per_connection=50e6, per_host=1e9) as url:
        with requests.Session() as one:
            assert one.get(f"{url}/blob", timeout=10).content == data
            assert one.get(f"{url}/blob", headers={"Range": "bytes=10-"}, timeout=10).content == data[10:]
        assert [sum(v) for v in charged.values()] == [2 * len(data) - 10]  # one bucket, every byte
        with requests.Session() as other:
            assert other.get(f"{url}/blob", timeout=10).content == data
    assert sorted(sum(v) for v in charged.values()) == [len(data), 2 * len(data) - 10]


def _split_of(p: Plan, entries: list[Entry]) -> Split:
    """The split capture would plan for `p`, from the plan alone (no tree on disk)."""
    packages, others = parse_status(status_text(p.packages))
    files = {pkg.name: pkg.owns for pkg in p.packages}
    scripts = {pkg.name: frozenset(parse_script_paths(pkg.postinst.encode())) for pkg in p.packages}
    db = Database(packages, files, others, scripts)
    specs = tuple(parse_component_arg(c) for c in p.components)
    return plan_split(db, specs, entries, Exclusions())


def test_synthetic_plan_has_the_promised_shape() -> None:
    p = plan(SyntheticSpec())
    assert plan(SyntheticSpec()) == p  # deterministic
    assert 35_000 <= p.files <= 45_000 and 2.7e9 <= p.bytes <= 3.3e9
    kinds = {"dir": Kind.DIR, "file": Kind.FILE, "hardlink": Kind.FILE, "symlink": Kind.SYMLINK}
    sizes = {n.path: n.size for n in p.nodes}
    entries = [Entry("/", Kind.DIR)] + [
        Entry(n.path, kinds[n.kind], n.size, n.target if n.kind == "symlink" else None) for n in p.nodes
    ]
    split = _split_of(p, entries)
    gb = {image: sum(sizes[f] for f in files) / 1e9 for image, files in split.files.items()}
    assert 0.7 <= gb["os"] <= 1.0 and 1.1 <= gb["db"] <= 1.4
    assert 0.4 <= gb["web"] <= 0.6 and 0.3 <= gb["app"] <= 0.5
    assert len(split.files["web"]) >= 10_000 and len(split.files["os"]) >= 14_000
    assert split.package_owner == {pkg.name: pkg.image for pkg in p.packages}
    # The data dirs go with their components (rule 4), the doubly owned config to the OS.
    assert split.image_of("/var/lib/synthdb/ibdata0") == "db"
    assert split.image_of("/etc/systemd/system/multi-user.target.wants/synthweb.service") == "web"
    assert split.image_of("/etc/synth/common.conf") == "os"
    assert "/etc/synth" in split.dirs["web"] and "/etc/synth" in split.dirs["app"]


def test_synthetic_tree_is_built_once_and_dpkg_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOOTENV_CACHE", str(tmp_path))
    spec = SyntheticSpec(scale=0.001)
    old = tmp_path / "bench/synthetic-gold-0123456789abcdef"  # an older generator's tree
    old.mkdir(parents=True)
    old.with_name(old.name + ".complete").write_text("0\n")
    tree = synthetic_tree(spec)
    assert not old.exists() and not old.with_name(old.name + ".complete").exists()
    assert tree.parent == tmp_path / "bench" and tree.with_name(tree.name + ".complete").exists()
    stamp = (tree / "var/lib/dpkg/status").stat().st_mtime_ns
    assert synthetic_tree(spec) == tree
    assert (tree / "var/lib/dpkg/status").stat().st_mtime_ns == stamp  # reused, not rebuilt
    p = plan(spec)
    db = read_database(tree)
    assert sorted(db.packages) == sorted(pkg.name for pkg in p.packages)
    assert db.packages["libc6"].info_prefix == "libc6:amd64"
    assert "/var/lib/synthdb" in db.script_paths["synthdb-server"]
    entries = scan(tree)
    assert _split_of(p, entries).package_owner == {pkg.name: pkg.image for pkg in p.packages}
    assert {e.path for e in entries} == {"/"} | {n.path for n in p.nodes} | {
        f"/var/lib/dpkg/{name}" for name in ("status", *(f"info/{i}" for i in os.listdir(tree / INFO)))
    }
    for n in p.nodes:
        st = os.lstat(f"{tree}{n.path}")
        if n.kind == "file":
            assert st.st_size == (len(n.text.encode()) if n.text is not None else n.size), n.path
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (n.mode, n.uid, n.gid), n.path
        if n.kind == "hardlink":
            assert st.st_ino == os.stat(f"{tree}{n.target}").st_ino
    assert stat.S_IMODE((tree / "etc/synth").stat().st_mode) == 0o750
    pool = make_pool(spec.seed)
    assert 2.0 <= len(pool) / len(zstandard.ZstdCompressor(level=3).compress(pool)) <= 3.5


def test_synthetic_os_is_compressible_and_keyed_by_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory benchmark's OS image compresses as real data does (not 2560:1), and a
    new generator version builds it anew, removing the older one."""
    from bench.synthetic import SYNTHETIC_OS_VERSION, synthetic_os
    from bootenv.manifest import parse_manifest

    monkeypatch.setenv("BOOTENV_CACHE", str(tmp_path / "cache"))
    old = tmp_path / "cache/bench/synthetic-os-8M"  # the first generator's, unversioned
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    d = synthetic_os(tmp_path, 8 << 20)
    assert d.name == f"synthetic-os-8M-v{SYNTHETIC_OS_VERSION}" and not old.exists()
    assert not (tmp_path / "synthetic.img").exists()
    m = parse_manifest((d / "manifest.json").read_bytes())
    assert m.os.data.raw_size == 8 << 20 and m.rootfs.image_size == 16 << 20
    assert 1.8 <= m.os.data.raw_size / m.os.data.size <= 3.5
    stamp = (d / "manifest.json").stat().st_mtime_ns
    assert synthetic_os(tmp_path, 8 << 20) == d
    assert (d / "manifest.json").stat().st_mtime_ns == stamp  # cached


def test_stream_bound_uses_chunks_when_the_manifest_has_them() -> None:
    assert stream_bound([63, 20, 17], 3) == pytest.approx(100 / 63)  # the largest binds
    assert stream_bound([10] * 9, 3) == pytest.approx(3.0)  # the streams bind
    data = Blob("x.tar.zst", "0" * 64, 90, 300)
    whole = Component("c", data, ("p",), (), 3, ())
    chunked = replace(whole, chunks=(Chunk(0, 40, 100, "1" * 64), Chunk(40, 50, 200, "2" * 64)))
    assert fetch_units(whole) == [90]
    assert fetch_units(chunked) == [40, 50]
    assert rows([Result("a", "")]) == [Result("a", "")] and rows(Result("b", "")) == [Result("b", "")]


def test_alternating_rounds_reverse_the_order_every_other_time() -> None:
    from bench.scenarios import alternating

    order: list[str] = []
    alternating(3, [lambda: order.append("ours"), lambda: order.append("theirs")])
    assert order == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]


def test_bench_images_are_signed_once_with_a_cached_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import scenarios
    from bootenv.signing import SIGNATURE, Trust, fingerprint, read_public_key, verify

    monkeypatch.setenv("BOOTENV_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "img"
    image.mkdir()
    (image / "manifest.json").write_text('{"x": 1}\n')
    scenarios.signed(image)
    first = (image / SIGNATURE).read_bytes()
    key = scenarios.bench_key()
    assert scenarios.trust() == ["--trust", f"{key}.pub"]
    public = read_public_key(Path(f"{key}.pub"))
    assert verify((image / "manifest.json").read_bytes(), first, Trust(keys=(public,))) == fingerprint(public)
    mtime = (image / SIGNATURE).stat().st_mtime_ns
    scenarios.signed(image)  # current: left as it is
    assert (image / SIGNATURE).stat().st_mtime_ns == mtime and scenarios.bench_key() == key
    (image / "manifest.json").write_text('{"x": 2}\n')  # a new capture: signed again
    scenarios.signed(image)
    again = (image / SIGNATURE).read_bytes()
    assert again != first
    assert verify((image / "manifest.json").read_bytes(), again, Trust(keys=(public,))) == fingerprint(public)


def test_results_name_the_commit_they_measured(
    tmp_path: Path, allow_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.run import code_version

    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    top = Path(__file__).resolve().parents[2]
    if not (top / ".git").exists():
        pytest.skip(f"{top} is not a git checkout")
    here = code_version()
    assert isinstance(here["commit"], str) and len(here["commit"]) == 40
    assert isinstance(here["modified"], bool)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert code_version(tmp_path) == {"commit": None, "modified": None}  # not a checkout


def test_only_code_makes_a_checkout_modified(
    tmp_path: Path, allow_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results a run writes (bench/results, tracked) do not make the code measured
    "modified"; a changed or new file of bootenv or the harness does."""
    import subprocess

    from bench.run import code_version

    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for rel in ("bootenv/a.py", "bench/run.py", "bench/results/chart.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    assert code_version(tmp_path)["modified"] is False
    (tmp_path / "bench/results/chart.png").write_text("2\n")
    (tmp_path / "bench/results/bench-1.json").write_text("{}\n")
    assert code_version(tmp_path)["modified"] is False
    (tmp_path / "bootenv/new.py").write_text("1\n")
    assert code_version(tmp_path)["modified"] is True
    (tmp_path / "bootenv/new.py").unlink()
    (tmp_path / "bench/run.py").write_text("2\n")
    assert code_version(tmp_path)["modified"] is True


def _env(tmp_path: Path, runs: int) -> Env:
    return Env(
        tmp_path, tmp_path / "images", "http://127.0.0.1:1", tmp_path / "gold", "lamp", runs, target=tmp_path
    )


def _streams(argv: Sequence[str]) -> int:
    return int(argv[list(argv).index("--streams") + 1])


def test_parallel_takes_the_stream_counts_in_turn_each_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1, 2, 3 streams, then 3, 2, 1, then 1, 2, 3: not all runs of one count in a row."""
    from bench import scenarios

    order: list[int] = []

    def fake_repeat(runs: int, prepare: object, argv: Sequence[str], **_: object) -> list[Sample]:
        order.extend([_streams(argv)] * runs)
        return [Sample(1.0, 1)] * runs

    monkeypatch.setattr(scenarios, "repeat", fake_repeat)
    samples = scenarios.stream_rounds(3, 3, "http://127.0.0.1:1/img", tmp_path / "root")
    assert order == [1, 2, 3, 3, 2, 1, 1, 2, 3]
    assert {k: len(v) for k, v in samples.items()} == {1: 3, 2: 3, 3: 3}


def test_split_and_single_alternate_and_the_layout_starts_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split then single, then single then split; the page cache is dropped before the
    split's layout (after a reboot on a real machine), not only before its write-os."""
    from bench import scenarios

    log: list[str] = []

    @contextlib.contextmanager
    def fake_loop(disk: Path) -> Iterator[str]:
        log.append("loop")
        yield "/dev/loopX"

    @contextlib.contextmanager
    def fake_mount(dev: str, mnt: Path) -> Iterator[Path]:
        log.append("mount")
        yield mnt

    def fake_measure(argv: Sequence[str], *, stdout: Path | None = None, **_: object) -> Sample:
        assert argv[1] == "layout" and stdout is not None
        log.append("layout")
        components = [{"name": "db", "status": "done", "ready_after": 0.5}]
        stdout.write_text(json.dumps({"seconds": 0.8, "components": components}))
        return Sample(1.0, 1)

    def fake_write_os(image: str, disk: Path, *args: str) -> Sample:
        assert disk.stat().st_size == 1 << 20  # a fresh disk of the size asked
        log.append("write-os " + " ".join(args) if args else "write-os")
        return Sample(2.0, 1)

    monkeypatch.setattr(scenarios, "direct_loop", fake_loop)
    monkeypatch.setattr(scenarios, "mounted", fake_mount)
    monkeypatch.setattr(scenarios, "measure", fake_measure)
    monkeypatch.setattr(scenarios, "_write_os", fake_write_os)
    monkeypatch.setattr(scenarios, "drop_caches", lambda trim=None: log.append("drop"))
    monkeypatch.setattr(scenarios, "_fresh", lambda path: (path.unlink(missing_ok=True), log.append("fresh")))
    runs = scenarios._split_rounds(_env(tmp_path, 2), "http://x/img", tmp_path / "disk.img", 1 << 20)
    split = ["fresh", "write-os", "loop", "mount", "drop", "layout"]
    single = ["fresh", "write-os --single"]
    assert log == split + single + single + split
    assert len(runs.os) == len(runs.single) == 2 and runs.total == [3.0, 3.0]
    assert runs.ready == {"db": [2.0 + 0.2 + 0.5] * 2}  # OS, the process's start, the layout's own


def test_memory_takes_the_image_sizes_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 GB's runs, then 4 GB's, then back: not every 1 GB run first."""
    from bench import scenarios, throttle

    order: list[tuple[str, str]] = []

    def fake_repeat(runs: int, prepare: object, argv: Sequence[str], **kw: object) -> list[Sample]:
        assert kw == {"tree": True}
        what = f"layout/{_streams(argv)}" if argv[1] == "layout" else argv[1]
        order.append((what, argv[3].rsplit("/", 1)[1]))
        return [Sample(1.0, 40 << 10, shmem_kb=8 << 10, total_kb=50 << 10)] * runs

    @contextlib.contextmanager
    def fake_serve(root: Path, **_: object) -> Iterator[str]:
        yield "http://127.0.0.1:1"

    monkeypatch.setattr(scenarios, "repeat", fake_repeat)
    monkeypatch.setattr(throttle, "serve", fake_serve)
    monkeypatch.setattr(scenarios, "signed", lambda image: image)
    monkeypatch.setattr(scenarios, "synthetic_component", lambda n: tmp_path / f"comp-{n >> 30}")
    monkeypatch.setattr(scenarios, "synthetic_os", lambda work, n: tmp_path / f"os-{n >> 30}")
    monkeypatch.setattr(scenarios, "trust", lambda: [])
    r = scenarios.memory(_env(tmp_path, 2))
    one = [("layout/1", "comp-1"), ("layout/2", "comp-1"), ("write-os", "os-1")]
    four = [("layout/1", "comp-4"), ("layout/2", "comp-4"), ("write-os", "os-4")]
    assert order == one + four + four[::-1] + one[::-1]
    assert r.passed and r.ratio == 1.0
    assert r.measurements["layout 4 GB, 2 streams: chunks held in memfds, peak (MiB)"].median == 8


def test_os_stream_and_capture_run_on_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both inputs: capture copies each input's own tree and names its components."""
    from bench import scenarios

    lamp = scenarios.Input("", "lamp", "mysql", 10e6, tmp_path / "gold", ("a=x",))
    synthetic = scenarios.Input(" (synthetic)", "synth", "web", 25e6, tmp_path / "tree", ("b=y", "c=z"))
    monkeypatch.setattr(scenarios, "inputs", lambda env: [lamp, synthetic])
    commands: list[str] = []

    def fake_measure(argv: Sequence[str], **_: object) -> Sample:
        commands.append(" ".join(argv))
        return Sample(1.0, 1)

    monkeypatch.setattr(scenarios, "measure", fake_measure)
    monkeypatch.setattr(scenarios, "repeat", lambda n, prep, argv, **kw: [fake_measure(argv)] * n)
    monkeypatch.setattr(scenarios, "drop_caches", lambda trim=None: None)
    out = scenarios.capture_speed(_env(tmp_path, 1))
    assert [r.name for r in out] == ["capture", "capture (synthetic)"] and all(r.passed for r in out)
    copies = [c for c in commands if c.startswith("cp ")]
    assert copies == [f"cp -a {tmp_path}/gold/. {tmp_path}/gold", f"cp -a {tmp_path}/tree/. {tmp_path}/gold"]
    captures = [c for c in commands if " capture " in c]
    assert captures[0].endswith("--component a=x") and captures[1].endswith("--component b=y --component c=z")
    seen: list[str] = []
    monkeypatch.setattr(
        scenarios, "_os_stream", lambda env, inp: (seen.append(inp.image), Result("x", ""))[1]
    )
    assert len(scenarios.os_stream(_env(tmp_path, 1))) == 2 and seen == ["lamp", "synth"]


def test_cpu_facts_name_the_cpu_and_measure_sha256() -> None:
    """Every result file says what CPU it ran on and how fast it hashes: what moves a
    capture's or a layout's ratio to tar from one machine to the next, beside the disk."""
    facts = harness.cpu_facts()
    flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    assert facts["sha_ni"] == ("sha_ni" in flags.split())
    assert isinstance(facts["cpu_model"], str) and facts["cpu_model"] != "?"
    assert isinstance(facts["sha256_mb_s"], int) and facts["sha256_mb_s"] > 10
    json.dumps(facts)  # it goes into the result file's meta
