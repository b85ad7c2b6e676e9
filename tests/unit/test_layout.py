"""`bootenv layout` into temp roots: files, shared paths, dpkg, verification, callback."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bootenv import conflicts, resolution, streampool
from bootenv import layout as layout_mod
from bootenv import schedule as schedule_mod
from bootenv.cli import main
from bootenv.errors import UserError
from bootenv.event_schema import StepStatus, parse_event
from bootenv.journal import STATE_DIR
from bootenv.layout import LayoutConfig, LayoutResult, layout
from tests.hostile.kit import MTIME, Comp, d, f, hard, make_image, snapshot, special, sym

ELF_A = b"\x7fELF\x02\x01\x01\0" + b"A" * 64
ELF_B = b"\x7fELF\x02\x01\x01\0" + b"B" * 64


def status(pkg: str) -> str:
    return f"Package: {pkg}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0\n"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, list[str]]] = []

    def __call__(self, root: Path, units: list[str]) -> list[str]:
        self.calls.append((root, units))
        return ["recorded"]


def run(
    image: Path, root: Path, comps: str | tuple[str, ...], streams: int = 1, **kw: object
) -> LayoutResult:
    act = kw.pop("activator", None) or Recorder()
    return layout(LayoutConfig(str(image), comps, root, streams=streams), activator=act, **kw)  # type: ignore[arg-type]


def web() -> Comp:
    return Comp(
        "web",
        [
            d("etc"),
            d("etc/web"),
            f("etc/web/web.conf", "listen 80\n"),
            d("usr"),
            d("usr/bin"),
            f("usr/bin/webd", ELF_A, mode=0o4755, uid=0, gid=0),
            f("usr/bin/helper", "#!/bin/sh\n", mode=0o2750, uid=33, gid=33),
            hard("usr/bin/webd-hl", "./usr/bin/webd"),
            sym("usr/bin/web", "webd"),
            d("var"),
            d("var/lib"),
            d("var/lib/web", mode=0o700, uid=33, gid=33),
            special("var/lib/web/fifo", b"6"),
            f("var/lib/web/tagged", "x", **{"SCHILY.xattr.user.bootenv": "yes"}),
        ],
        units=("web.service",),
        packages=("webd",),
        status=status("webd"),
    )


def test_one_component_exact_metadata(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [web()])
    root = tmp_path / "root"
    root.mkdir()
    act = Recorder()
    res = run(image, root, ("web",), activator=act)
    assert res.ok and res.components[0].status == "done"
    assert (root / "etc/web/web.conf").read_text() == "listen 80\n"
    st = (root / "usr/bin/webd").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime == MTIME
    helper = (root / "usr/bin/helper").stat()
    assert stat.S_IMODE(helper.st_mode) == 0o2750
    assert stat.S_IMODE((root / "var/lib/web").stat().st_mode) == 0o700
    assert (root / "usr/bin/webd-hl").stat().st_ino == st.st_ino
    assert os.readlink(root / "usr/bin/web") == "webd"
    assert stat.S_ISFIFO((root / "var/lib/web/fifo").lstat().st_mode)
    assert os.getxattr(root / "var/lib/web/tagged", "user.bootenv") == b"yes"
    assert "Package: webd" in (root / "var/lib/dpkg/status").read_text()
    assert act.calls == [(root, ["web.service"])]
    leftovers = [p for p in root.rglob(".bootenv~*")]
    assert leftovers == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give files another owner (chown)")
def test_one_component_owners(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [web()])
    root = tmp_path / "root"
    root.mkdir()
    assert run(image, root, ("web",)).ok
    for path in ("usr/bin/helper", "var/lib/web"):  # www-data's, in the archive
        st = (root / path).lstat()
        assert (st.st_uid, st.st_gid) == (33, 33), path


def three(tmp_path: Path) -> Path:
    base = Comp(
        "base", [d("opt"), d("opt/base"), f("opt/base/lib.so", ELF_A)], packages=("b",), status=status("b")
    )
    mid = Comp("mid", [d("opt"), d("opt/mid"), f("opt/mid/m", "m\n")], depends=("base",), status=status("m"))
    top = Comp("top", [d("opt"), d("opt/top"), f("opt/top/t", "t\n")], depends=("mid",), status=status("t"))
    return make_image(tmp_path / "img", [base, mid, top])


def test_dependencies_are_pulled_in_and_reported(tmp_path: Path) -> None:
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res = run(image, root, ("top",))
    assert res.added == ("base", "mid")
    assert {c.name for c in res.components} == {"base", "mid", "top"}
    assert (root / "opt/base/lib.so").read_bytes() == ELF_A


@pytest.mark.parametrize("streams", [1, 3])
def test_each_component_says_when_it_was_ready_within_the_whole_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: int
) -> None:
    """ready_after counts from the layout's start, not from the component's own."""
    real = layout_mod.clean_stale

    class Clock:
        """The layout's clock: the real one, and 100 s more once the stale clean-up ran."""

        offset = 0.0

        def monotonic(self) -> float:
            return time.monotonic() + self.offset

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    clock = Clock()

    def slow(root: Path) -> None:  # before any component starts: 100 s on the layout's clock
        clock.offset += 100.0
        real(root)

    monkeypatch.setattr(layout_mod, "time", clock)
    monkeypatch.setattr(schedule_mod, "time", clock)
    monkeypatch.setattr(layout_mod, "clean_stale", slow)
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    began = clock.monotonic()
    res = run(image, root, "all", streams=streams)
    took = clock.monotonic() - began
    assert res.ok and 100 < res.seconds <= took
    for c in res.components:
        # After the 100 s and its own work, before the layout's end (activation is after).
        assert c.seconds + 100 <= c.ready_after < res.seconds, c
    assert json.loads(json.dumps(res.to_dict()))["seconds"] == res.seconds


@pytest.mark.parametrize(("streams", "frozen"), [(1, 0), (3, 1)])
def test_the_objects_shared_with_forked_streams_are_frozen_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: int, frozen: int
) -> None:
    """gc.freeze() before the fork: the streams' collector never writes to (and so never
    copies) the pages they share with the layout's process; unfrozen once they are gone.
    One stream forks nothing."""
    import multiprocessing

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(
        streampool.gc, "freeze", lambda: calls.append(("freeze", len(multiprocessing.active_children())))
    )
    monkeypatch.setattr(
        streampool.gc,
        "unfreeze",
        lambda: calls.append(("unfreeze", len(multiprocessing.active_children()))),
    )
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    assert run(image, root, "all", streams=streams).ok
    assert calls == [("freeze", 0), ("unfreeze", 0)] * frozen  # no stream alive at either


def test_none_lays_out_nothing(tmp_path: Path) -> None:
    image = three(tmp_path)
    res = run(image, tmp_path, "none")
    assert res.components == () and not (tmp_path / "opt").exists()


def test_unknown_component_lists_available(tmp_path: Path) -> None:
    image = three(tmp_path)
    with pytest.raises(UserError) as err:
        run(image, tmp_path, ("nope",))
    assert "nope" in str(err.value) and "base, mid, top" in str(err.value)


def test_parallel_equals_sequential(tmp_path: Path) -> None:
    image = three(tmp_path)
    trees = []
    for streams in (1, 3):
        root = tmp_path / f"root{streams}"
        root.mkdir()
        assert run(image, root, "all", streams=streams).ok
        trees.append(snapshot(root))
    assert trees[0] == trees[1]


@pytest.mark.parametrize("streams", [1, 3])
def test_a_flusher_syncs_the_root_while_the_pieces_are_laid_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: int
) -> None:
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    seen: list[tuple[str, Path, bool, dict[str, str]]] = []

    def look(what: str, path: Path) -> None:
        phases = {p.stem: json.loads(p.read_text())["phase"] for p in (root / STATE_DIR).glob("*.json")}
        seen.append((what, path, (root / "opt/top/t").exists(), phases))

    class Watched(schedule_mod.Flusher):
        def __init__(self, path: Path, interval: float | None = None) -> None:
            look("open", path)
            super().__init__(path, interval)
            assert self.running

        def close(self) -> None:
            look("close", root)
            super().close()

    monkeypatch.setattr(schedule_mod, "Flusher", Watched)
    assert run(image, root, "all", streams=streams).ok
    # Opened on the root before the first file; closed after the last file and after
    # every component's final syncfs (the journal's `files` phase), before the dpkg merge.
    files = {"base": "files", "mid": "files", "top": "files"}
    assert seen == [("open", root, False, {}), ("close", root, True, files)]


def test_a_write_error_the_flusher_saw_fails_the_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The final syncfs opens a description of its own, which the kernel does not tell of
    # an error the flusher's saw first: the layout must ask the flusher.
    class SawEIO(schedule_mod.Flusher):
        def __init__(self, path: Path, interval: float | None = None) -> None:
            super().__init__(path, interval)
            self.error = OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(schedule_mod, "Flusher", SawEIO)
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res = run(image, root, "all")
    assert not res.ok
    assert {(c.name, c.status) for c in res.components} == {
        ("base", "failed"),
        ("mid", "failed"),
        ("top", "failed"),
    }
    assert all(c.error and f"writing to {root} failed: Input/output error" in c.error for c in res.components)
    assert not list((root / STATE_DIR).glob("*.json"))  # the journal never says `files`


_FORKS: dict[str, list[set[threading.Thread]]] = {}  # "seen", while a test records: threads at each fork


def _record_fork() -> None:
    if "seen" in _FORKS:
        _FORKS["seen"].append(set(threading.enumerate()))


os.register_at_fork(before=_record_fork)  # a hook stays registered: it records only when asked


def test_the_streams_are_forked_before_any_thread_of_the_layout_runs(tmp_path: Path) -> None:
    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    before = set(threading.enumerate())
    _FORKS["seen"] = []
    try:
        assert run(image, root, "all", streams=3).ok
        forks = _FORKS["seen"]
    finally:
        del _FORKS["seen"]
    # A fork copies only the forking thread, with every lock another thread held then.
    assert len(forks) == 3
    assert all(alive <= before for alive in forks), [alive - before for alive in forks]


def shared_image(tmp_path: Path) -> Path:
    a = Comp(
        "a",
        [d("etc"), f("etc/shared.conf", "from a\n"), d("usr"), f("usr/same", "same\n"), f("usr/tool", ELF_A)],
    )
    b = Comp(
        "b",
        [d("etc"), f("etc/shared.conf", "from b"), d("usr"), f("usr/same", "same\n"), f("usr/tool", ELF_B)],
    )
    c = Comp("c", [d("etc"), f("etc/shared.conf", "from a\n")])
    return make_image(tmp_path / "img", [a, b, c])


def test_identical_shared_file_is_left_alone(tmp_path: Path) -> None:
    """b brings usr/same exactly as a laid it out: the file a made stays, untouched."""
    image = shared_image(tmp_path)
    root = tmp_path / "r"
    root.mkdir()
    assert run(image, root, ("a",)).ok
    before = (root / "usr/same").stat()
    res = run(image, root, ("b",))
    after = (root / "usr/same").stat()
    assert (root / "usr/same").read_text() == "same\n"
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ), "replaced or touched"
    assert [(c.name, c.identical) for c in res.components] == [("b", 1)]


@pytest.mark.parametrize("os_base", [False, True])
def test_text_config_concatenation_is_order_independent(tmp_path: Path, os_base: bool) -> None:
    image = shared_image(tmp_path)
    results = []
    for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]):
        root = tmp_path / "-".join(order)
        (root / "etc").mkdir(parents=True)
        if os_base:
            (root / "etc/shared.conf").write_text("# os\n")
        for name in order:  # one component per run: the arrival order is forced
            run(image, root, (name,))
        results.append((root / "etc/shared.conf").read_text())
    expected = ("# os\n" if os_base else "") + "from a\nfrom b\n"
    assert results == [expected] * 3
    # all at once, in parallel, gives the same
    root = tmp_path / "parallel"
    (root / "etc").mkdir(parents=True)
    if os_base:
        (root / "etc/shared.conf").write_text("# os\n")
    run(image, root, "all", streams=3)
    assert (root / "etc/shared.conf").read_text() == expected


def test_binary_conflict_keeps_both_and_resolves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = shared_image(tmp_path)
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/tool").write_bytes(b"os tool")
    res = run(image, root, ("a",))
    assert (root / "usr/tool").read_bytes() == b"os tool"
    assert (root / "var/lib/bootenv/conflicts/a/usr/tool").read_bytes() == ELF_A
    (cid,) = res.components[0].conflicts
    rec = conflicts.load(root, cid)
    assert rec.path == "usr/tool" and rec.existing["size"] == 7 and rec.incoming["size"] == len(ELF_A)
    run(image, root, ("a",))  # a re-run keeps one record
    assert [c.id for c in conflicts.load_all(root)] == [cid]
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    assert cid in capsys.readouterr().out
    assert main(["conflicts", "resolve", cid, "--keep", "incoming", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"conflict {cid} resolved: kept incoming at 20") and "{" not in out
    assert (root / "usr/tool").read_bytes() == ELF_A
    assert conflicts.load(root, cid).resolution["keep"] == "incoming"  # type: ignore[index]


def test_text_conflict_show_has_a_diff(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [Comp("x", [d("usr"), f("usr/notes.txt", "one\ntwo\n")])])
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/notes.txt").write_text("one\n")
    (cid,) = run(image, root, ("x",)).components[0].conflicts
    text = conflicts.diff(root, conflicts.load(root, cid))
    assert "+two" in text
    resolution.resolve(root, cid, "merged", None)
    assert (root / "usr/notes.txt").read_text() == "one\none\ntwo\n"


def test_dpkg_status_merged_once(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [web()])
    root = tmp_path / "root"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(status("base-files") + "\n")
    run(image, root, ("web",))
    first = (root / "var/lib/dpkg/status").read_text()
    # forget the journal: the whole component is laid out and merged again
    for p in (root / "var/lib/bootenv/layout/state").iterdir():
        p.unlink()
    run(image, root, ("web",))
    text = (root / "var/lib/dpkg/status").read_text()
    assert text == first and text.count("Package: webd") == 1 and text.startswith("Package: base-files")


def test_corrupt_blob_is_not_activated(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [web()])
    manifest = json.loads((image / "manifest.json").read_text())
    blob = image / manifest["components"][0]["data"]["file"]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    root = tmp_path / "root"
    root.mkdir()
    act = Recorder()
    res = run(image, root, ("web",), activator=act)
    assert not res.ok and res.components[0].status == "failed"
    assert act.calls == [] and not (root / "var/lib/dpkg/status").exists()


def test_callback_receives_events(tmp_path: Path, events: tuple[str, list[dict[str, object]]]) -> None:
    url, got = events
    image = three(tmp_path)
    layout(LayoutConfig(str(image), "all", tmp_path, streams=2, callback=url), activator=Recorder())
    # Every event is one `bootenv serve` accepts (the callback contract).
    parsed = [parse_event(e) for e in got]
    assert all(e.source == "layout" for e in parsed)
    starts = [e.component for e in parsed if e.step == "component" and e.status == StepStatus.START]
    ends = [e.component for e in parsed if e.step == "component" and e.status == StepStatus.DONE]
    assert sorted(starts) == sorted(ends) == ["base", "mid", "top"]
    assert [e.kind.value for e in parsed][-2:] == ["components_laid_out", "done"]
    times = [float(str(e["time"])) for e in got]
    assert times == sorted(times)


def test_cli_layout_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bootenv.layout as lay

    monkeypatch.setattr(lay, "activate", Recorder())
    image = three(tmp_path)
    rc = main(["layout", "--image", str(image), "--components", "top", "--root", str(tmp_path), "--insecure"])
    out = capsys.readouterr().out
    assert rc == 0 and "added as dependencies: base, mid" in out and "top" in out


def test_a_unit_that_fails_to_start_fails_the_layout(tmp_path: Path) -> None:
    from bootenv.activate import FAILED_UNIT

    image = three(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    got: list[dict[str, object]] = []

    def activator(root: Path, units: list[str]) -> list[str]:
        return ["ldconfig done", f"{FAILED_UNIT}mariadb.service"]

    res = layout(LayoutConfig(str(image), "all", root), activator=activator, emit=got.append)
    assert res.failed_units == ("mariadb.service",) and not res.ok
    assert all(c.status == "done" for c in res.components)  # the files are in place
    last = parse_event(got[-1])
    assert last.kind.value == "error" and "unit mariadb.service" in (last.message or "")


def test_the_running_system_is_refused_unless_bootenv_provisioned_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bootenv import target

    assert not target.provisioned(tmp_path)
    (tmp_path / "etc/bootenv").mkdir(parents=True)
    (tmp_path / "etc/bootenv/layout.json.done").write_text("{}")  # the first layout was done
    assert target.provisioned(tmp_path)
    # Whatever this machine is, `/` counts as not provisioned here: nothing may be written.
    monkeypatch.setattr(target, "provisioned", lambda root: False)
    image = str(tmp_path / "no-image")  # the refusal comes before the image is read
    assert main(["layout", "--image", image, "--components", "all", "--root", "/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to lay out into the running system" in err[0] and "--force" in err[0]
    with pytest.raises(UserError, match="neither a directory nor"):  # --force goes on to read it
        layout(LayoutConfig(image, "all", Path("/"), force=True))


def test_a_failed_layout_is_one_error_with_the_worst_kind_of_exit_code() -> None:
    from bootenv.schedule import ComponentResult

    ok = LayoutResult((ComponentResult("a", "done"),), (), ())
    assert ok.failure() is None
    bad = LayoutResult(
        (
            ComponentResult("a", "failed", error="a: HTTP 503\ngiving up", code=3),
            ComponentResult("b", "failed", error="b: sub-image does not match its sha256", code=4),
        ),
        (),
        (),
    )
    failure = bad.failure()
    assert failure is not None and failure.exit_code == 4
    assert str(failure) == "layout failed: a: HTTP 503; b: sub-image does not match its sha256"


def test_a_layout_of_no_component_reads_no_image(tmp_path: Path) -> None:
    """The first boot of a machine provisioned from a directory of its ramdisk's (or from
    the single image) runs a layout of none: the image is not there, and not needed."""
    got: list[dict[str, object]] = []
    res = layout(
        LayoutConfig(str(tmp_path / "not-here"), "none", tmp_path), activator=Recorder(), emit=got.append
    )
    assert res.components == () and res.ok
    assert [e["event"] for e in got][-1] == "done"
