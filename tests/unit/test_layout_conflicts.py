"""Conflicts that must not stop a layout: what a conflicting directory holds, and a
merged config the admin edited afterwards."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from bootenv import conflicts, resolution
from bootenv import layout as layout_module
from bootenv.cli import main
from bootenv.conflicts import EDITED, MERGED
from bootenv.errors import UserError
from bootenv.layout import LayoutConfig, LayoutResult, layout
from bootenv.merge import MergeState, Meta
from tests.hostile.kit import MTIME, ActivatedUnits, Comp, d, f, hard, make_image

STORE = "var/lib/bootenv/conflicts"
CHUNK = 4 << 10  # a few files per chunk


def run(
    image: Path, root: Path, comps: str | tuple[str, ...], streams: int = 1
) -> tuple[LayoutResult, ActivatedUnits]:
    act = ActivatedUnits()
    return layout(LayoutConfig(str(image), comps, root, streams=streams), activator=act), act


def _os_thing(root: Path, kind: str) -> None:
    """What the OS has at /opt/x: a file, or a symlink (to a directory, even)."""
    (root / "opt").mkdir(parents=True)
    if kind == "file":
        (root / "opt/x").write_text("os file\n")
    else:
        os.symlink("/usr", root / "opt/x")


@pytest.mark.parametrize(
    ("kind", "streams", "chunk"), [("file", 1, 0), ("symlink", 2, 0), ("file", 2, CHUNK)]
)
def test_directories_inside_a_conflicting_directory_go_to_the_store_and_the_layout_completes(
    tmp_path: Path, kind: str, streams: int, chunk: int
) -> None:
    big = [f(f"opt/x/y/z/file{i}", os.urandom(1500)) for i in range(12)]  # several chunks
    a = Comp(
        "a",
        [d("opt"), d("opt/x"), d("opt/x/y"), d("opt/x/y/z"), f("opt/x/y/f", "hi"), *big],
        units=("a.service",),
    )
    b = Comp("b", [d("srv"), f("srv/ok", "fine")], units=("b.service",))
    image = make_image(tmp_path / "img", [a, b], chunk=chunk)
    root = tmp_path / "root"
    _os_thing(root, kind)
    res, act = run(image, root, "all", streams=streams)
    assert res.ok, [c.error for c in res.components]
    assert [(c.name, c.status) for c in res.components] == [("a", "done"), ("b", "done")]
    assert sorted(act.units) == ["a.service", "b.service"]
    (cid,) = res.components[0].conflicts
    assert conflicts.load(root, cid).path == "opt/x"
    # The OS's /opt/x is as it was; the component's directory, whole, is in the store.
    if kind == "file":
        assert (root / "opt/x").read_text() == "os file\n"
    else:
        assert os.readlink(root / "opt/x") == "/usr"
    stored = root / STORE / "a/opt/x"
    assert (stored / "y/f").read_text() == "hi"
    assert len(list((stored / "y/z").iterdir())) == 12
    # Those directories got their mtimes, by the name they have in the store.
    assert (stored / "y").stat().st_mtime == MTIME and (stored / "y/z").stat().st_mtime == MTIME
    assert (root / "srv/ok").read_text() == "fine"
    again, _ = run(image, root, "all", streams=streams)  # nothing left to do
    assert [c.status for c in again.components] == ["resumed", "resumed"]


def test_a_hardlink_inside_a_conflicting_directory_is_made_in_the_store(tmp_path: Path) -> None:
    a = Comp(
        "a",
        [d("opt"), d("opt/x"), f("opt/x/a", "hi"), hard("opt/x/b", "./opt/x/a"), f("opt/keep", "k")],
    )
    image = make_image(tmp_path / "img", [a])
    root = tmp_path / "root"
    _os_thing(root, "file")
    res, _ = run(image, root, ("a",))
    assert res.ok and res.components[0].status == "done", res.components[0].error
    (cid,) = res.components[0].conflicts
    assert conflicts.load(root, cid).path == "opt/x"
    stored = root / STORE / "a/opt/x"
    assert (stored / "b").read_text() == "hi"
    assert (stored / "b").stat().st_ino == (stored / "a").stat().st_ino
    assert (root / "opt/x").read_text() == "os file\n"
    assert (root / "opt/keep").read_text() == "k"  # the rest of the component is in


def _conf(name: str) -> Comp:
    return Comp(name, [d("etc"), f("etc/foo.conf", f"from {name}\n", mode=0o640)])


def test_a_merged_config_the_admin_edited_is_kept_and_the_new_merge_is_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "img", [_conf(n) for n in "abcd"])
    root = tmp_path / "root"
    root.mkdir()
    conf = root / "etc/foo.conf"
    run(image, root, ("a",))
    # b's merge is interrupted after bootenv noted what it is about to write and before
    # the file is replaced (a kill -9 there): the re-run must not take the file it
    # finds for an edit of the admin's.
    real = MergeState.merge_into

    def killed(content: bytes, meta: Meta) -> None:
        raise OSError("killed")

    def killed_before_apply(
        self: MergeState,
        relpath: str,
        component: str,
        data: bytes,
        meta: Meta,
        read_existing: Callable[[], tuple[bytes, Meta]],
        apply: Callable[[bytes, Meta], None],
        **kw: Any,
    ) -> bool:
        return real(self, relpath, component, data, meta, read_existing, killed, **kw)

    monkeypatch.setattr(MergeState, "merge_into", killed_before_apply)
    assert not run(image, root, ("b",))[0].ok
    assert conf.read_text() == "from a\n"
    monkeypatch.setattr(MergeState, "merge_into", real)
    res, _ = run(image, root, ("b",))
    assert res.ok and res.components[0].merged == ("etc/foo.conf",) and not res.components[0].conflicts
    assert conf.read_text() == "from a\nfrom b\n"

    with open(conf, "a") as fh:  # the admin edits it
        fh.write("admin: tuned\n")
    res, _ = run(image, root, ("c",))
    assert res.ok and res.components[0].merged == ()
    assert conf.read_text() == "from a\nfrom b\nadmin: tuned\n"  # the admin's file stays
    (cid,) = res.components[0].conflicts
    rec = conflicts.load(root, cid)
    assert (rec.component, rec.path, rec.reason) == ("c", "etc/foo.conf", EDITED)
    stored = root / rec.stored
    assert stored.read_text() == "from a\nfrom b\nfrom c\n"  # the merge it would have written
    assert stored.stat().st_mode & 0o777 == 0o640
    diff = conflicts.diff(root, rec)
    assert "-admin: tuned" in diff and "+from c" in diff
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    assert cid in capsys.readouterr().out

    # Taking bootenv's merge makes the file bootenv's again: the next component merges.
    resolution.resolve(root, cid, "incoming", None)
    assert conf.read_text() == "from a\nfrom b\nfrom c\n"
    res, _ = run(image, root, ("d",))
    assert res.ok and res.components[0].merged == ("etc/foo.conf",) and not res.components[0].conflicts
    assert conf.read_text() == "from a\nfrom b\nfrom c\nfrom d\n"


@pytest.mark.parametrize("edit", [False, True])
def test_an_edit_of_a_config_bootenv_placed_is_kept_and_the_update_is_a_conflict(
    tmp_path: Path, edit: bool
) -> None:
    """web v1 places /etc/web/web.conf, the admin adds a line, web v2 is laid out: the
    admin's file was taken for the OS's and merged with v2 (v1, the edit, then v2). It
    stays, and v2 is offered beside it; unedited, v2 replaces v1."""

    def web(conf: str) -> Comp:
        return Comp("web", [d("etc"), d("etc/web"), f("etc/web/web.conf", conf)])

    v1 = make_image(tmp_path / "v1", [web("Listen 80\nTimeout 300\n")])
    v2 = make_image(tmp_path / "v2", [web("Listen 80\nTimeout 60\n")])
    root = tmp_path / "root"
    root.mkdir()
    conf = root / "etc/web/web.conf"
    assert run(v1, root, ("web",))[0].ok
    if edit:
        conf.write_text(conf.read_text() + "ServerName web1\n")
    res, _ = run(v2, root, ("web",))
    (web2,) = res.components
    if not edit:
        assert (web2.merged, web2.conflicts) == (("etc/web/web.conf",), ())
        assert conf.read_text() == "Listen 80\nTimeout 60\n"
        return
    assert res.ok and web2.merged == ()
    assert conf.read_text() == "Listen 80\nTimeout 300\nServerName web1\n"
    (cid,) = web2.conflicts
    rec = conflicts.load(root, cid)
    assert (rec.path, rec.reason) == ("etc/web/web.conf", EDITED)
    assert (root / rec.stored).read_text() == "Listen 80\nTimeout 60\n"  # v2, nothing of the edit
    resolution.resolve(root, cid, "merged", None)
    assert conf.read_text() == "Listen 80\nTimeout 300\nServerName web1\nListen 80\nTimeout 60\n"


@pytest.mark.parametrize("in_place", [b"Listen 80", b"Listen 80\r\n"])
def test_a_config_in_place_that_differs_only_in_its_line_ends_is_not_appended_again(
    tmp_path: Path, in_place: bytes
) -> None:
    image = make_image(tmp_path / "img", [Comp("web", [d("etc"), f("etc/httpd.conf", "Listen 80\n")])])
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/httpd.conf").write_bytes(in_place)
    res, _ = run(image, root, ("web",))
    assert res.ok and not res.components[0].conflicts
    assert (root / "etc/httpd.conf").read_bytes() == in_place


def _httpd(tmp_path: Path) -> tuple[Path, Path]:
    """The OS's httpd.conf and web's, which both hold `Listen 80`."""
    image = make_image(tmp_path / "img", [Comp("web", [d("etc"), f("etc/httpd.conf", "Listen 80\n")])])
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/httpd.conf").write_text("Listen 80\nServerName web1.example\n")
    return image, root


@pytest.mark.parametrize("keep", ["merged", "existing", "incoming"])
def test_a_merge_is_listed_for_review_and_resolved_like_a_conflict(
    tmp_path: Path, keep: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A concatenation may hold a directive twice: the admin sees every merge in
    `bootenv conflicts`, as a kind of its own, with the component's version beside it.
    It is not one of the layout's conflicts, nor reported again by a resumed layout."""
    image, root = _httpd(tmp_path)
    res, _ = run(image, root, ("web",))
    (web,) = res.components
    assert res.ok and (web.merged, web.conflicts) == (("etc/httpd.conf",), ())
    merged = "Listen 80\nServerName web1.example\nListen 80\n"
    assert (root / "etc/httpd.conf").read_text() == merged
    (rec,) = conflicts.load_all(root)
    assert (rec.component, rec.path, rec.reason, rec.resolution) == ("web", "etc/httpd.conf", MERGED, None)
    assert (root / rec.stored).read_text() == "Listen 80\n"
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert rec.id in out and "merged: review" in out and "open" in out
    assert conflicts.diff(root, rec).count("-ServerName web1.example") == 1
    again, _ = run(image, root, ("web",))
    assert [(c.status, c.conflicts) for c in again.components] == [("resumed", ())]

    assert main(["conflicts", "resolve", rec.id, "--keep", keep, "--root", str(root)]) == 0
    want = "Listen 80\n" if keep == "incoming" else merged
    assert (root / "etc/httpd.conf").read_text() == want
    assert not (root / rec.stored).exists()
    assert conflicts.load(root, rec.id).resolution == {"keep": keep, "at": ANY}


def test_every_component_in_a_merge_is_listed_whatever_the_order(tmp_path: Path) -> None:
    """The component that placed the file is in the merge too: listed by the one that
    merged into it, so the records do not depend on which came first."""
    image = make_image(tmp_path / "img", [_conf(n) for n in "abc"])
    found = set()
    for i, (order, streams) in enumerate([(("a", "b", "c"), 1), (("c", "b", "a"), 1), (("all",), 3)]):
        root = tmp_path / f"root{i}"
        root.mkdir()
        for name in order:
            assert run(image, root, name if name == "all" else (name,), streams=streams)[0].ok
        recs = conflicts.load_all(root)
        found.add(
            tuple((r.component, r.reason, (root / r.stored).read_text(), r.existing["sha256"]) for r in recs)
        )
    ((a, b, c),) = found
    assert [x[:3] for x in (a, b, c)] == [(n, MERGED, f"from {n}\n") for n in "abc"]


def test_a_file_that_is_the_components_version_alone_is_not_listed(tmp_path: Path) -> None:
    """No OS version, or one the component's equals: nothing to review."""
    image, root = _httpd(tmp_path)
    (root / "etc/httpd.conf").write_text("Listen 80")  # the same, but for its last newline
    res, _ = run(image, root, ("web",))
    assert res.ok and conflicts.load_all(root) == []
    v1 = make_image(tmp_path / "v1", [Comp("app", [d("etc"), f("etc/app.conf", "v=1\n")])])
    v2 = make_image(tmp_path / "v2", [Comp("app", [d("etc"), f("etc/app.conf", "v=2\n")])])
    run(v1, root, ("app",))
    res, _ = run(v2, root, ("app",))
    assert res.components[0].merged == ("etc/app.conf",) and conflicts.load_all(root) == []


def _big(name: str) -> Comp:
    line = f"{name}: setting\n"
    return Comp(name, [d("etc"), f("etc/big.conf", line * ((600 << 10) // len(line)))])


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a"), ("b", "a", "c")])
def test_versions_under_the_limit_merge_whatever_their_concatenation_weighs(
    tmp_path: Path, order: str
) -> None:
    """Each version is held to 1 MiB, not the file they merge into: with three of 600
    KiB, the third to arrive merges into 1.2 MiB like the others, whichever it is."""
    image = make_image(tmp_path / "img", [_big(n) for n in "abc"])
    root = tmp_path / "root"
    root.mkdir()
    for name in order:
        res, _ = run(image, root, (name,))
        assert res.ok and not res.components[0].conflicts, res.components[0]
    line = [f"{n}: setting\n" for n in "abc"]
    want = "".join(x * ((600 << 10) // len(x)) for x in line)
    assert len(want) > 1 << 20 and (root / "etc/big.conf").read_text() == want


def test_a_key_that_holds_no_nul_is_a_conflict_not_a_merge(tmp_path: Path) -> None:
    """Seven random 32-byte keys in eight hold no NUL: text is more than that."""
    ours, theirs = bytes(range(1, 33)), bytes(range(200, 232))
    image = make_image(tmp_path / "img", [Comp("a", [d("etc"), f("etc/app.key", theirs, mode=0o600)])])
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/app.key").write_bytes(ours)
    res, _ = run(image, root, ("a",))
    assert res.ok and res.components[0].merged == () and len(res.components[0].conflicts) == 1
    assert (root / "etc/app.key").read_bytes() == ours
    rec = conflicts.load(root, res.components[0].conflicts[0])
    assert (root / rec.stored).read_bytes() == theirs and conflicts.diff(root, rec) == ""


def test_damaged_merge_records_fail_the_component_in_one_line(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", [_conf(n) for n in "abc"])
    root = tmp_path / "root"
    root.mkdir()
    res, _ = run(image, root, ("a", "b"))
    assert res.ok and (root / "etc/foo.conf").read_text() == "from a\nfrom b\n"
    (meta,) = (root / "var/lib/bootenv/layout/merge").glob("*/part.a.meta")
    meta.write_bytes(b"")  # what a power cut could leave of a record written unsynced
    res, _ = run(image, root, ("c",))
    (c,) = res.components
    assert c.status == "failed" and c.error is not None and "\n" not in c.error
    assert f"the merge records in {meta.parent} are damaged" in c.error
    assert (root / "etc/foo.conf").read_text() == "from a\nfrom b\n"


def _edited_merge(tmp_path: Path) -> tuple[Path, Path, str]:
    """a and b merged into /etc/foo.conf, the admin's line added, then c: a conflict."""
    image = make_image(tmp_path / "img", [_conf(n) for n in "abc"])
    root = tmp_path / "root"
    root.mkdir()
    assert run(image, root, ("a", "b"))[0].ok
    with open(root / "etc/foo.conf", "a") as fh:
        fh.write("admin: tuned\n")
    res, _ = run(image, root, ("c",))
    (cid,) = res.components[0].conflicts
    return image, root, cid


def test_keeping_the_merge_of_an_edited_config_adds_only_the_components_part(tmp_path: Path) -> None:
    _, root, cid = _edited_merge(tmp_path)
    resolution.resolve(root, cid, "merged", None)
    assert (root / "etc/foo.conf").read_text() == "from a\nfrom b\nadmin: tuned\nfrom c\n"
    assert not (root / conflicts.load(root, cid).stored).exists()


def test_a_resolution_holds_for_its_version_only(tmp_path: Path) -> None:
    """Resolved, the same conflict found again (a re-run) stays resolved; another
    incoming version (a newer image of the component) is open again."""
    _, root, cid = _edited_merge(tmp_path)
    found = conflicts.load(root, cid)
    resolution.resolve(root, cid, "existing", None)
    conflicts.write_record(root, found)  # what a re-run that finds it again writes
    assert conflicts.load(root, cid).resolution == {"keep": "existing", "at": ANY}
    newer = make_image(
        tmp_path / "newer", [Comp("c", [d("etc"), f("etc/foo.conf", "from c, v2\n", mode=0o640)])]
    )
    res, _ = run(newer, root, ("c",))
    assert res.components[0].conflicts == (cid,)
    rec = conflicts.load(root, cid)
    assert rec.resolution is None and (root / rec.stored).read_text() == "from a\nfrom b\nfrom c, v2\n"
    resolution.resolve(root, cid, "incoming", None)
    assert (root / "etc/foo.conf").read_text() == "from a\nfrom b\nfrom c, v2\n"


def test_a_component_found_laid_out_reports_its_open_conflicts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layout stopped after a component's files were in, before it reported their
    conflicts (a shutdown during the dpkg merge): the re-run finds the component laid
    out, and reports what is still open."""
    image = make_image(tmp_path / "img", [_conf("a"), Comp("b", [d("opt"), f("opt/x", "b\n")])])
    root = tmp_path / "root"
    _os_thing(root, "file")

    def shutdown(*args: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(layout_module, "_merge_dpkg", shutdown)
        with pytest.raises(KeyboardInterrupt):
            run(image, root, ("a", "b"))
    (rec,) = conflicts.load_all(root)
    res, _ = run(image, root, ("a", "b"))
    assert [(c.name, c.status, c.conflicts) for c in res.components] == [
        ("a", "resumed", ()),
        ("b", "resumed", (rec.id,)),
    ]
    resolution.resolve(root, rec.id, "existing", None)
    res, _ = run(image, root, ("a", "b"))
    assert [c.conflicts for c in res.components] == [(), ()]


@pytest.mark.parametrize(
    "link",
    [
        "var",
        "var/lib",
        "var/lib/bootenv",
        "var/lib/bootenv/layout/merge",
        "var/lib/bootenv/layout/dirmeta",
        "var/lib/bootenv/layout/held",
    ],
)
def test_a_symlink_on_the_way_to_bootenvs_records_is_refused_before_anything_is_written(
    tmp_path: Path, link: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target whose /var is a symlink to /data/var: with --root /mnt, the records
    would land in the host's /data/var."""
    image = make_image(tmp_path / "img", [_conf("a")])
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (root / link).parent.mkdir(parents=True)
    os.symlink(outside, root / link)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(["layout", "--image", str(image), "--root", str(root), "--components", "a"]) == 2
    err = capsys.readouterr().err
    assert f"/{link} under {root} is a symlink (to {outside})" in err and "Traceback" not in err
    assert list(outside.iterdir()) == [] and sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.parametrize("path", ["usr/bin/tool", "etc/tool.conf"])
@pytest.mark.parametrize("kept", [0, 5])
def test_a_file_a_power_cut_cut_short_is_laid_out_whole(tmp_path: Path, path: str, kept: int) -> None:
    """What a power cut can leave of a file an interrupted run renamed into place: its
    name, owner, mode and mtime, and none or part of its data. The re-run lays it out
    whole: not a conflict, and not a merge of the piece with the whole."""
    body = "line one\nline two\n"
    top = path.split("/", maxsplit=1)[0]
    image = make_image(tmp_path / "img", [Comp("a", [d(top), f(path, body, mode=0o755)])])
    root = tmp_path / "root"
    (root / path).parent.mkdir(parents=True)
    (root / path).write_text(body[:kept])
    os.chmod(root / path, 0o755)
    os.utime(root / path, (MTIME, MTIME))
    res, _ = run(image, root, ("a",))
    (a,) = res.components
    assert res.ok and (a.conflicts, a.merged, a.files) == ((), (), 1)
    assert (root / path).read_text() == body


def test_a_shorter_file_that_is_not_the_components_is_a_conflict(tmp_path: Path) -> None:
    """A prefix of the incoming file, but with another mtime: the OS's, kept."""
    image = make_image(tmp_path / "img", [Comp("a", [d("usr"), f("usr/tool", "line one\nline two\n")])])
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/tool").write_text("line one\n")
    os.utime(root / "usr/tool", (MTIME + 1, MTIME + 1))
    res, _ = run(image, root, ("a",))
    assert len(res.components[0].conflicts) == 1 and (root / "usr/tool").read_text() == "line one\n"


def test_a_second_layout_on_the_same_root_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """An admin's layout next to the first-boot unit's: each would take the other's temp
    files for a killed run's. The lock is another process's (a POSIX lock is its
    process's own: the layout's forked streams do not hold it)."""
    import fcntl

    image = make_image(tmp_path / "img", [_conf("a")])
    root = tmp_path / "root"
    lock = root / "var/lib/bootenv/layout/lock"
    lock.parent.mkdir(parents=True)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the running layout: holds the lock until told to end
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(UserError, match=f"^another layout is running on {re.escape(str(root))} "):
            run(image, root, ("a",))
        assert not (root / "etc").exists()
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    res, _ = run(image, root, ("a",))
    assert res.ok and (root / "etc/foo.conf").read_text() == "from a\n"
