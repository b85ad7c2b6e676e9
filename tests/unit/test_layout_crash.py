"""kill -9 at random points during a parallel layout, then a re-run: the same tree."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

import bootenv.schedule as schedule_mod
from bootenv import journal, writeback
from bootenv.extract import TreeWriter
from bootenv.journal import DIRS_DIR, DirLog, Journal
from bootenv.layout import LayoutConfig, layout
from bootenv.paxread import Member, PaxReader
from tests.conftest import seeds
from tests.hostile.kit import MTIME, Comp, d, f, make_image, snapshot, sym

SEEDS = seeds(6, 20)


def _no_activation(root: Path, units: list[str]) -> list[str]:
    return []


def crash_image(tmp: Path) -> Path:
    comps = []
    for name in ("alpha", "beta", "gamma"):
        members = [d("etc"), d("etc/conf.d"), f("etc/conf.d/shared.conf", f"# {name}\nkey={name}\n")]
        members += [d("usr"), d("usr/bin"), f("usr/bin/tool", b"\x7fELF" + name.encode() * 50)]
        members += [d("opt"), d(f"opt/{name}")]
        for i in range(150):
            members.append(
                f(f"opt/{name}/file{i:03d}", os.urandom(2000 + i), mode=0o640 if i % 3 else 0o4755)
            )
            if i % 10 == 0:
                members.append(sym(f"opt/{name}/link{i:03d}", f"file{i:03d}"))
        status = f"Package: pkg-{name}\nStatus: install ok installed\nArchitecture: amd64\n"
        comps.append(Comp(name, members, status=status))
    return make_image(tmp / "img", comps)


def seed_os(root: Path) -> None:
    (root / "etc/conf.d").mkdir(parents=True)
    (root / "etc/conf.d/shared.conf").write_text("# os\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"os tool")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("Package: base\nStatus: install ok installed\n\n")


def _child(image: str, root: str) -> None:
    os.setpgrp()  # the layout and its streams die together, like a power cut
    layout(LayoutConfig(image, "all", Path(root), streams=3), activator=_no_activation)


def _run_to_completion(image: Path, root: Path) -> None:
    res = layout(LayoutConfig(str(image), "all", root, streams=3), activator=_no_activation)
    assert res.ok


def _start(image: Path, root: Path) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(image), str(root)))
    proc.start()
    return proc


def _kill(proc: multiprocessing.process.BaseProcess) -> None:
    assert proc.pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.join()


def _finished(root: Path) -> bool:
    state = root / "var/lib/bootenv/layout/state"
    names = [state / f"{n}.json" for n in ("alpha", "beta", "gamma")]
    return all(p.exists() and '"done"' in p.read_text() for p in names)


@pytest.mark.slow
def test_kill_9_then_rerun_converges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kill -9 keeps the page cache: skip the flushes meant for power cuts (slow on a busy disk)
    monkeypatch.setattr(journal, "_fsync", lambda fd: None)
    monkeypatch.setattr(schedule_mod, "syncfs", lambda path: None)
    monkeypatch.setattr(writeback, "FLUSH_INTERVAL", 3600.0)
    image = crash_image(tmp_path)
    clean = tmp_path / "clean"
    seed_os(clean)
    start = time.monotonic()
    _run_to_completion(image, clean)
    duration = time.monotonic() - start
    expected = snapshot(clean)
    assert (
        expected["etc/conf.d/shared.conf"][4]
        == b"# os\n# alpha\nkey=alpha\n# beta\nkey=beta\n# gamma\nkey=gamma\n"
    )
    assert expected["usr/bin/tool"][4] == b"os tool"
    interrupted = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        root = tmp_path / f"crash{seed}"
        seed_os(root)
        cuts = rng.randint(1, 2)  # one or two power cuts that land mid-layout, then a full run
        window = duration
        for _ in range(12):  # bounded: on a busy machine a cut may land after the end
            proc = _start(image, root)
            time.sleep(rng.uniform(0, window))
            _kill(proc)
            if _finished(root):  # too late: start this seed again, and aim earlier
                shutil.rmtree(root)
                seed_os(root)
                window /= 2
                continue
            interrupted += 1
            cuts -= 1
            if not cuts:
                break
        _run_to_completion(image, root)
        got = snapshot(root)
        assert not [p for p in got if ".bootenv~" in p]
        assert got == expected, f"seed {seed}: the tree differs after a kill -9 and a re-run"
        status = (root / "var/lib/dpkg/status").read_text()
        assert all(status.count(f"Package: pkg-{n}") == 1 for n in ("alpha", "beta", "gamma"))
    assert interrupted >= len(SEEDS)  # at least one kill per seed landed before the layout was done


def _die(*args: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_layout(image: str, root: str, where: str) -> None:
    """In a forked child: a layout killed -9 mid-way through its one component's piece,
    or once the piece is in, before the final job gives the directories their mtimes."""
    if where == "final":
        schedule_mod._finish = _die  # type: ignore[assignment]
    else:
        place = TreeWriter.place

        def place_or_die(self: TreeWriter, m: Member, reader: PaxReader) -> None:
            if m.name == where:
                _die()
            place(self, m, reader)

        TreeWriter.place = place_or_die  # type: ignore[method-assign]
    layout(LayoutConfig(image, "all", Path(root), streams=1), activator=_no_activation)


@pytest.mark.parametrize("where", ["final", "opt/app/sub/f"])
def test_a_rerun_gives_the_directories_a_killed_run_made_their_mtimes(tmp_path: Path, where: str) -> None:
    members = [d("opt"), d("opt/app"), d("opt/app/sub"), f("opt/app/sub/f", "x"), f("opt/app/g", "y")]
    image = make_image(tmp_path / "img", [Comp("a", [*members, d("opt/app/late"), f("opt/app/late/h", "z")])])
    root = tmp_path / "root"
    root.mkdir()
    proc = multiprocessing.get_context("fork").Process(
        target=_killed_layout, args=(str(image), str(root), where)
    )
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert (root / "opt/app").stat().st_mtime != MTIME  # what was laid out after it changed it
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=_no_activation)
    assert res.ok and res.components[0].status == "done"
    for name in ("opt/app", "opt/app/sub", "opt/app/late"):
        assert (root / name).stat().st_mtime == MTIME, name
    assert (root / "opt/app/late/h").read_text() == "z"
    assert not (root / DIRS_DIR / "a").exists()  # the component is in: its log is done with


def test_a_directory_log_names_its_blob_and_skips_a_line_a_kill_cut_short(tmp_path: Path) -> None:
    one, two = "1" * 64, "2" * 64
    with DirLog(tmp_path, "a", one) as log:
        log.add("opt", 5)
        log.add("opt/x", 6)
    path = tmp_path / DIRS_DIR / "a"
    with open(path, "ab") as fh:
        fh.write(b'["opt/cu')  # the kill came mid-line
    with DirLog(tmp_path, "a", one) as log:
        assert log.earlier == [("opt", 5), ("opt/x", 6)]
        log.add("opt/y", 7)
    with DirLog(tmp_path, "a", one) as log:
        assert log.earlier == [("opt", 5), ("opt/x", 6), ("opt/y", 7)]
    with DirLog(tmp_path, "a", two) as log:  # another blob: that run's directories are not its
        assert log.earlier == []
    Journal(tmp_path).set("a", two, "files")
    assert not path.exists()
