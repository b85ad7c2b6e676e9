"""Alternatives groups shared by the OS and a component: the database format, the
selection, the capture's plan, the OS image's view and the layout's merge."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bootenv import altmerge
from bootenv.alternatives import (
    FormatError,
    Fragment,
    Shared,
    dump_fragments,
    links,
    load_fragments,
    parse,
    render,
    select,
)
from bootenv.assign import plan_split
from bootenv.dpkg import read_database
from bootenv.errors import FatalError
from bootenv.exclude import Exclusions
from bootenv.intree import disk_links, resolve
from bootenv.journal import TEMPS_DIR
from bootenv.split import OS, ComponentSpec, Split
from bootenv.staging import stage
from bootenv.sweep import sweep
from bootenv.walk import scan
from tests.unit.fakeroot import make_tree

# As update-alternatives wrote it on the LAMP gold (Debian 12).
AWK = """auto
/usr/bin/awk
awk.1.gz
/usr/share/man/man1/awk.1.gz
nawk
/usr/bin/nawk
nawk.1.gz
/usr/share/man/man1/nawk.1.gz

/usr/bin/gawk
10
/usr/share/man/man1/gawk.1.gz
/usr/bin/gawk
/usr/share/man/man1/gawk.1.gz
/usr/bin/mawk
5
/usr/share/man/man1/mawk.1.gz
/usr/bin/mawk
/usr/share/man/man1/mawk.1.gz

"""

# Manual on the component's vim; nano (the OS's) has the higher priority and lacks a slave.
EDITOR = """manual
/usr/bin/editor
editor.1.gz
/usr/share/man/man1/editor.1.gz
editor.fr.1.gz
/usr/share/man/fr/man1/editor.1.gz

/usr/bin/nano
40
/usr/share/man/man1/nano.1.gz

/usr/bin/vim.basic
30
/usr/share/man/man1/vim.1.gz
/usr/share/man/fr/man1/vim.1.gz

"""


def test_an_entry_round_trips_byte_for_byte() -> None:
    for name, text in (
        ("awk", AWK),
        ("editor", EDITOR),
        ("php", "auto\n/usr/bin/php\n\n/usr/bin/php8\n50\n\n"),
    ):
        group = parse(name, text)
        assert render(group) == text
    awk = parse("awk", AWK)
    assert awk.slaves[0] == ("awk.1.gz", "/usr/share/man/man1/awk.1.gz")
    assert [(c.path, c.priority) for c in awk.choices] == [("/usr/bin/gawk", 10), ("/usr/bin/mawk", 5)]
    assert parse("editor", EDITOR).choices[0].slaves == ("/usr/share/man/man1/nano.1.gz", "")


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("awk", AWK.rstrip("\n"), "newline"),
        ("awk", AWK.replace("auto", "automatic"), "mode"),
        ("awk", AWK.replace("\n10\n", "\nten\n"), "priority"),
        ("awk", AWK + "x\n", "after"),
        ("awk", AWK[: AWK.index("/usr/bin/mawk\n5")], "ends before"),
        ("a/b", AWK, "bad alternative name"),
        ("awk", AWK.replace("/usr/bin/mawk\n5", "/usr/bin/gawk\n5"), "twice"),
        ("awk", AWK.replace("\n/usr/bin/awk\n", "\nusr/bin/awk\n"), "absolute"),
    ],
)
def test_a_damaged_entry_is_refused(name: str, text: str, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        parse(name, text)


def test_the_view_of_some_candidates_selects_as_update_alternatives_does() -> None:
    awk, editor = parse("awk", AWK), parse("editor", EDITOR)
    mawk = select(awk, {"/usr/bin/mawk"}, "/usr/bin/gawk")
    assert mawk is not None and mawk.selected.path == "/usr/bin/mawk"
    assert render(mawk.group) == "auto\n/usr/bin/awk\nawk.1.gz\n/usr/share/man/man1/awk.1.gz\nnawk\n" + (
        "/usr/bin/nawk\nnawk.1.gz\n/usr/share/man/man1/nawk.1.gz\n\n/usr/bin/mawk\n5\n"
        "/usr/share/man/man1/mawk.1.gz\n/usr/bin/mawk\n/usr/share/man/man1/mawk.1.gz\n\n"
    )
    assert select(awk, set(), "/usr/bin/gawk") is None
    # Manual: the gold's choice when present, whatever the priorities; else auto.
    nano = select(editor, {"/usr/bin/nano"}, "/usr/bin/vim.basic")
    assert nano is not None and (nano.group.mode, nano.selected.path) == ("auto", "/usr/bin/nano")
    # As update-alternatives saves it: the French page's slave, which nano lacks, is dropped.
    assert render(nano.group) == (
        "auto\n/usr/bin/editor\neditor.1.gz\n/usr/share/man/man1/editor.1.gz\n\n"
        "/usr/bin/nano\n40\n/usr/share/man/man1/nano.1.gz\n\n"
    )
    both = {"/usr/bin/nano", "/usr/bin/vim.basic"}
    vim = select(editor, both, "/usr/bin/vim.basic")
    assert vim is not None and vim.selected.path == "/usr/bin/vim.basic" and render(vim.group) == EDITOR
    # A tie goes to the first listed, as update-alternatives' best choice.
    tied = parse("awk", AWK.replace("\n5\n", "\n10\n"))
    assert (
        view := select(tied, {"/usr/bin/gawk", "/usr/bin/mawk"}, "")
    ) and view.selected.path == "/usr/bin/gawk"


def test_the_links_follow_the_selected_candidate_slaves_included() -> None:
    editor = parse("editor", EDITOR)
    assert links(editor, select(editor, {"/usr/bin/nano"}, "")) == {
        "/usr/bin/editor": "/etc/alternatives/editor",
        "/etc/alternatives/editor": "/usr/bin/nano",
        "/usr/share/man/man1/editor.1.gz": "/etc/alternatives/editor.1.gz",
        "/etc/alternatives/editor.1.gz": "/usr/share/man/man1/nano.1.gz",
        "/usr/share/man/fr/man1/editor.1.gz": None,  # nano has no French page
        "/etc/alternatives/editor.fr.1.gz": None,
    }
    assert set(links(editor, None).values()) == {None}


def test_fragments_round_trip_and_a_damaged_one_is_refused() -> None:
    frag = Fragment(AWK, "/usr/bin/gawk", ("/usr/bin/gawk",))
    assert load_fragments(dump_fragments({"awk": frag})) == {"awk": frag}
    for bad in (
        b"[]",
        b'{"awk": {"entry": "auto\\n"}}',
        b"{",
        b'{"awk": {"entry": "x", "selected": "", "ours": []}}',
    ):
        with pytest.raises(FormatError):
            load_fragments(bad)


# The fake gold with two shared groups: awk (gawk in component db, selected; mawk in the
# OS) and editor (manual on vim.basic in db; nano in the OS). php's group is php's alone.
SPECS = (
    ComponentSpec("web", ("httpd",)),
    ComponentSpec("db", ("dbserver",)),
    ComponentSpec("php", ("modphp",)),
)
OS_FILES = [
    "/usr/bin/mawk",
    "/usr/share/man/man1/mawk.1.gz",
    "/usr/bin/nano",
    "/usr/share/man/man1/nano.1.gz",
]
DB_FILES = [
    "/usr/bin/gawk",
    "/usr/share/man/man1/gawk.1.gz",
    "/usr/bin/vim.basic",
    "/usr/share/man/man1/vim.1.gz",
    "/usr/share/man/fr/man1/vim.1.gz",
]
GOLD_LINKS = {
    "/etc/alternatives/awk": "/usr/bin/gawk",
    "/etc/alternatives/awk.1.gz": "/usr/share/man/man1/gawk.1.gz",
    "/etc/alternatives/nawk": "/usr/bin/gawk",
    "/etc/alternatives/nawk.1.gz": "/usr/share/man/man1/gawk.1.gz",
    "/usr/bin/awk": "/etc/alternatives/awk",
    "/usr/share/man/man1/awk.1.gz": "/etc/alternatives/awk.1.gz",
    "/usr/bin/nawk": "/etc/alternatives/nawk",
    "/usr/share/man/man1/nawk.1.gz": "/etc/alternatives/nawk.1.gz",
    "/etc/alternatives/editor": "/usr/bin/vim.basic",
    "/etc/alternatives/editor.1.gz": "/usr/share/man/man1/vim.1.gz",
    "/etc/alternatives/editor.fr.1.gz": "/usr/share/man/fr/man1/vim.1.gz",
    "/usr/bin/editor": "/etc/alternatives/editor",
    "/usr/share/man/man1/editor.1.gz": "/etc/alternatives/editor.1.gz",
    "/usr/share/man/fr/man1/editor.1.gz": "/etc/alternatives/editor.fr.1.gz",
}


def shared_gold(root: Path) -> Path:
    """The fake gold, with the awk and editor groups (tests/root uses it too)."""
    gold = make_tree(root)
    info = gold / "var/lib/dpkg/info"
    for pkg, paths in (("dpkg", OS_FILES), ("dbserver", DB_FILES)):
        with open(info / f"{pkg}.list", "a") as f:
            f.write("".join(p + "\n" for p in paths))
        for p in paths:
            (gold / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (gold / p.lstrip("/")).write_text(f"{pkg}:{p}\n")
    for link, target in GOLD_LINKS.items():
        os.symlink(target, gold / link.lstrip("/"))
    (gold / "var/lib/dpkg/alternatives/awk").write_text(AWK)
    (gold / "var/lib/dpkg/alternatives/editor").write_text(EDITOR)
    return gold


def _planned(gold: Path) -> tuple[Split, Split, tuple[Shared, ...]]:
    entries = scan(gold)
    split = plan_split(read_database(gold), SPECS, entries, Exclusions())
    return (split, *altmerge.plan(gold, entries, split))


def test_a_shared_groups_paths_go_to_the_os_and_others_stay(tmp_path: Path) -> None:
    gold = shared_gold(tmp_path / "gold")
    before, after, shared = _planned(gold)
    assert [s.gold.name for s in shared] == ["awk", "editor"]
    # The split alone gives the gold's selection's links and entry to db ...
    for path in ("/etc/alternatives/awk", "/usr/bin/awk", "/var/lib/dpkg/alternatives/editor"):
        assert before.image_of(path) == "db"
    # ... and now every path of the two groups is the OS's, and only those moved.
    for path in [*GOLD_LINKS, "/var/lib/dpkg/alternatives/awk", "/var/lib/dpkg/alternatives/editor"]:
        assert after.image_of(path) == OS, path
    moved = {p for p in before.files["db"] if after.image_of(p) != "db"}
    assert moved == {p for s in shared for p in s.moved}
    assert "/usr/share/man/fr/man1" in after.dirs[OS]
    for path in ("/etc/alternatives/php", "/usr/bin/php", "/var/lib/dpkg/alternatives/php"):
        assert before.image_of(path) == after.image_of(path) == "php"
    # A gold whose groups are all in one sub-image has its split unchanged.
    plain = make_tree(tmp_path / "plain")
    split, same, none = _planned(plain)
    assert same is split and none == ()


def _links_of(root: Path) -> dict[str, str | None]:
    return {
        p: os.readlink(root / p.lstrip("/")) if os.path.islink(root / p.lstrip("/")) else None
        for p in GOLD_LINKS
    }


def _os_target(tmp_path: Path) -> tuple[Path, Path, tuple[Shared, ...]]:
    """The OS sub-image's tree as capture stages it (the hard-link farm), with its view."""
    gold = shared_gold(tmp_path / "gold")
    _, split, shared = _planned(gold)
    target = tmp_path / "target"
    target.mkdir()
    stage(gold, sorted({*split.dirs[OS], *split.files[OS]}), target, tmp_path)
    altmerge.write_os_view(target, shared)
    return gold, target, shared


def _lay_out(
    gold: Path,
    target: Path,
    shared: tuple[Shared, ...],
    tmp_path: Path,
    name: str = "db",
    files: list[str] = DB_FILES,
) -> list[str]:
    """A component's files put in place, as its stream does; then merged with the record
    the OS image carries."""
    for p in files:
        (target / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(gold / p.lstrip("/"), target / p.lstrip("/"))
    return altmerge.merge_component_alternatives(target, name)


def test_the_os_alone_has_its_own_candidates_and_the_component_brings_the_golds_back(tmp_path: Path) -> None:
    gold, target, shared = _os_target(tmp_path)
    db = target / "var/lib/dpkg/alternatives"
    # (a) The OS image alone: working links to its own candidates, entries listing them.
    assert (
        resolve("/usr/bin/awk", disk_links(target)) == "/usr/bin/mawk" and (target / "usr/bin/mawk").is_file()
    )
    assert os.readlink(target / "etc/alternatives/awk.1.gz") == "/usr/share/man/man1/mawk.1.gz"
    assert os.readlink(target / "etc/alternatives/editor") == "/usr/bin/nano"
    assert not os.path.lexists(target / "etc/alternatives/editor.fr.1.gz")
    assert not os.path.lexists(target / "usr/share/man/fr/man1/editor.1.gz")
    assert (db / "awk").read_text() == render(select(parse("awk", AWK), {"/usr/bin/mawk"}, "").group)  # type: ignore[union-attr]
    assert (db / "editor").read_text().startswith("auto\n") and "vim" not in (db / "editor").read_text()
    # The gold is untouched (the staged links and entries are new files).
    assert _links_of(gold) == GOLD_LINKS and (gold / "var/lib/dpkg/alternatives/awk").read_text() == AWK
    # The OS carries db's record of its candidates (web and php have none in a shared
    # group), in directories made for it; the gold's /var/lib keeps its times.
    records = target / "var/lib/bootenv/alternatives"
    assert [p.name for p in records.iterdir()] == ["db"] and oct(records.stat().st_mode) == "0o40755"
    assert load_fragments((records / "db").read_bytes()) == {
        "awk": Fragment(AWK, "/usr/bin/gawk", ("/usr/bin/gawk",)),
        "editor": Fragment(EDITOR, "/usr/bin/vim.basic", ("/usr/bin/vim.basic",)),
    }
    assert (target / "var/lib").stat().st_mtime_ns == (gold / "var/lib").stat().st_mtime_ns
    # (b) With component db laid out: the gold's links and entries, byte for byte.
    assert _lay_out(gold, target, shared, tmp_path) == []
    assert _links_of(target) == GOLD_LINKS
    assert (db / "awk").read_text() == AWK and (db / "editor").read_text() == EDITOR
    assert sorted(p.name for p in db.iterdir()) == ["awk", "editor"]  # no temp file left
    # Again: nothing changes, nothing to say.
    assert altmerge.merge_component_alternatives(target, "db") == []
    assert _links_of(target) == GOLD_LINKS and (db / "editor").read_text() == EDITOR


@pytest.mark.parametrize("order", [("db", "web"), ("web", "db")])
def test_components_sharing_a_group_end_as_the_gold_in_any_order(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    """A third awk, in component web (the lowest priority): the OS with web alone keeps
    mawk, and with both the group is the gold's, whichever comes first."""
    gold = shared_gold(tmp_path / "gold")
    awk = AWK[:-1] + "/usr/bin/original-awk\n1\n" + "\n" * 3 + "\n"  # none of the 3 slaves
    assert [c.path for c in parse("awk", awk).choices][2] == "/usr/bin/original-awk"
    (gold / "var/lib/dpkg/alternatives/awk").write_text(awk)
    (gold / "usr/bin/original-awk").write_text("web's awk\n")
    with open(gold / "var/lib/dpkg/info/httpd.list", "a") as f:
        f.write("/usr/bin/original-awk\n")
    _, split, shared = _planned(gold)
    target = tmp_path / "target"
    target.mkdir()
    stage(gold, sorted({*split.dirs[OS], *split.files[OS]}), target, tmp_path)
    altmerge.write_os_view(target, shared)
    files = {"db": DB_FILES, "web": ["/usr/bin/original-awk"]}
    first, second = order
    assert _lay_out(gold, target, shared, tmp_path, first, files[first]) == []
    got = (target / "var/lib/dpkg/alternatives/awk").read_text()
    assert ("/usr/bin/original-awk" in got) == (first == "web") and ("/usr/bin/gawk" in got) == (
        first == "db"
    )
    expect = "/usr/bin/gawk" if first == "db" else "/usr/bin/mawk"
    assert os.readlink(target / "etc/alternatives/awk") == expect
    assert _lay_out(gold, target, shared, tmp_path, second, files[second]) == []
    assert (target / "var/lib/dpkg/alternatives/awk").read_text() == awk
    assert _links_of(target) == GOLD_LINKS


class _Killed(BaseException):
    """kill -9 at a syscall: nothing after it runs, no cleanup (the merge has none)."""


def _killed_at(monkeypatch: pytest.MonkeyPatch, call: str, merge: Callable[[], object]) -> None:
    """Run `merge`, killed at its first os.`call` (before it)."""

    def kill(*args: object, **kwargs: object) -> None:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(os, call, kill)
        with pytest.raises(_Killed):
            merge()


def _temps(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".bootenv~*"))


def test_a_run_killed_between_the_links_and_the_entry_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gold, target, shared = _os_target(tmp_path)
    _killed_at(monkeypatch, "replace", lambda: _lay_out(gold, target, shared, tmp_path))  # the entry's rename
    assert _links_of(target)["/etc/alternatives/awk"] == "/usr/bin/gawk"  # the links are done
    assert _temps(target) == ["var/lib/dpkg/alternatives/.bootenv~db~alt~awk.dpkg-tmp"]
    # The next layout: its sweep, then the merge.
    sweep(target, {"db"}, None)
    assert _temps(target) == []
    assert altmerge.merge_component_alternatives(target, "db") == []
    assert _links_of(target) == GOLD_LINKS
    assert (target / "var/lib/dpkg/alternatives/awk").read_text() == AWK
    assert sorted(p.name for p in (target / "var/lib/dpkg/alternatives").iterdir()) == ["awk", "editor"]
    assert _temps(target) == [] and not (target / TEMPS_DIR / "db").exists()  # nothing left to sweep


def test_a_temp_link_a_kill_left_goes_though_the_group_is_left_to_the_admin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between a new link and its rename; the admin then sets the group by hand,
    which the next merge leaves alone: the temp link goes all the same, at the next
    layout, whatever it lays out."""
    gold, target, shared = _os_target(tmp_path)
    _killed_at(monkeypatch, "rename", lambda: _lay_out(gold, target, shared, tmp_path))
    assert _temps(target) == ["etc/alternatives/.bootenv~db~alt~awk"]
    db = target / "var/lib/dpkg/alternatives"
    (db / "awk").write_text((db / "awk").read_text().replace("auto\n", "manual\n", 1))
    swept = sweep(target, set(), None)  # a layout of other components
    assert [(s.component, s.removed) for s in swept] == [("db", 1)]
    assert _temps(target) == [] and not (target / TEMPS_DIR / "db").exists()
    assert altmerge.merge_component_alternatives(target, "db")[0].startswith(
        "alternatives awk left as they were"
    )
    assert _temps(target) == []


def test_the_admins_choice_is_kept_and_named(tmp_path: Path) -> None:
    gold, target, shared = _os_target(tmp_path)
    db = target / "var/lib/dpkg/alternatives"
    # update-alternatives --set awk /usr/bin/mawk: manual on mawk (the link is unchanged).
    (db / "awk").write_text((db / "awk").read_text().replace("auto\n", "manual\n", 1))
    # A link made by hand to the admin's own editor.
    (target / "etc/alternatives/editor").unlink()
    os.symlink("/usr/local/bin/ed", target / "etc/alternatives/editor")
    admins = {p: os.readlink(target / p.lstrip("/")) for p in ("/etc/alternatives/awk", "/usr/bin/awk")}
    warnings = _lay_out(gold, target, shared, tmp_path)
    assert warnings == [
        "alternatives awk left as they were: the target's entry is not as bootenv left it"
        " (changed with update-alternatives --set?)",
        "alternatives editor left as they were: /etc/alternatives/editor is not the link bootenv made"
        " (changed by hand?)",
    ]
    assert (db / "awk").read_text().startswith("manual\n/usr/bin/awk\n") and "gawk" not in (
        db / "awk"
    ).read_text()
    assert {p: os.readlink(target / p.lstrip("/")) for p in admins} == admins
    assert os.readlink(target / "etc/alternatives/editor") == "/usr/local/bin/ed"
    assert "vim" not in (db / "editor").read_text()
    # A group the admin removed stays removed.
    (db / "awk").unlink()
    assert altmerge.merge_component_alternatives(target, "db")[0] == (
        "alternatives awk left as they were: the target has no entry for them (removed?)"
    )
    assert not (db / "awk").exists()


def test_a_damaged_record_or_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    from bootenv.paxread import ArchiveError

    gold, target, shared = _os_target(tmp_path)
    _lay_out(gold, target, shared, tmp_path)
    record = target / "var/lib/bootenv/alternatives/db"
    record.write_text("{")
    with pytest.raises(FatalError, match="damaged alternatives record"):
        altmerge.merge_component_alternatives(target, "db")
    record.unlink()
    os.symlink("/etc/passwd", record)
    with pytest.raises(ArchiveError, match="symlink"):
        altmerge.merge_component_alternatives(target, "db")


def _update_alternatives(root: Path, *args: str) -> str:
    """dpkg's own tool on the target's tree, as a package's maintainer script runs it."""
    tool = shutil.which("update-alternatives")
    if tool is None:
        pytest.skip("update-alternatives (dpkg's) is not installed here")
    return subprocess.run(
        [tool, "--root", str(root), *args], check=True, capture_output=True, text=True
    ).stdout


NANO_INSTALL = (
    *("--install", "/usr/bin/editor", "editor", "/usr/bin/nano", "40"),
    *("--slave", "/usr/share/man/man1/editor.1.gz", "editor.1.gz", "/usr/share/man/man1/nano.1.gz"),
)


def test_a_group_update_alternatives_wrote_again_is_merged_all_the_same(
    tmp_path: Path, allow_run: None
) -> None:
    """nano's postinst runs update-alternatives --install at each upgrade or reinstall,
    which writes the OS's editor entry as dpkg does (a slave no candidate has dropped):
    still bootenv's, and laying out db brings the gold's selection back."""
    gold, target, shared = _os_target(tmp_path)
    db = target / "var/lib/dpkg/alternatives"
    _update_alternatives(target, *NANO_INSTALL)
    mawk = ("/usr/bin/mawk", "/usr/share/man/man1/mawk.1.gz")
    _update_alternatives(
        target,
        *("--install", "/usr/bin/awk", "awk", mawk[0], "5"),
        *("--slave", "/usr/share/man/man1/awk.1.gz", "awk.1.gz", mawk[1]),
        *("--slave", "/usr/bin/nawk", "nawk", mawk[0]),
        *("--slave", "/usr/share/man/man1/nawk.1.gz", "nawk.1.gz", mawk[1]),
    )
    assert os.readlink(target / "etc/alternatives/editor") == "/usr/bin/nano"
    assert _lay_out(gold, target, shared, tmp_path) == []
    assert _links_of(target) == GOLD_LINKS
    assert (db / "awk").read_text() == AWK and (db / "editor").read_text() == EDITOR


def test_a_candidate_the_target_added_stays_beside_the_components(tmp_path: Path, allow_run: None) -> None:
    """apt installed ed and busybox's awk on the OS alone (candidates the gold does not
    list): they stay, the component's join them, and the selection is the gold's manual
    one, or update-alternatives' best in auto mode (busybox's, the highest)."""
    gold, target, shared = _os_target(tmp_path)
    db = target / "var/lib/dpkg/alternatives"
    for extra in ("usr/bin/ed", "usr/share/man/man1/ed.1.gz", "usr/bin/busybox"):
        (target / extra).write_text("the target's own\n")
    _update_alternatives(
        target,
        *("--install", "/usr/bin/editor", "editor", "/usr/bin/ed", "-100"),
        *("--slave", "/usr/share/man/man1/editor.1.gz", "editor.1.gz", "/usr/share/man/man1/ed.1.gz"),
    )
    _update_alternatives(target, "--install", "/usr/bin/awk", "awk", "/usr/bin/busybox", "20")
    assert _lay_out(gold, target, shared, tmp_path) == []
    editor = parse("editor", (db / "editor").read_text())
    assert [c.path for c in editor.choices] == ["/usr/bin/nano", "/usr/bin/vim.basic", "/usr/bin/ed"]
    assert {p: t for p, t in _links_of(target).items() if "editor" in p} == {
        p: t for p, t in GOLD_LINKS.items() if "editor" in p
    }
    awk = parse("awk", (db / "awk").read_text())
    assert [c.path for c in awk.choices] == ["/usr/bin/gawk", "/usr/bin/mawk", "/usr/bin/busybox"]
    assert awk.mode == "auto" and os.readlink(target / "etc/alternatives/awk") == "/usr/bin/busybox"
    assert not os.path.lexists(target / "etc/alternatives/awk.1.gz")  # busybox has no page
    # update-alternatives reads what the merge wrote, and agrees.
    query = _update_alternatives(target, "--query", "editor")
    assert "Status: manual\nBest: /usr/bin/nano\nValue: /usr/bin/vim.basic\n" in query
    assert "Alternative: /usr/bin/ed\nPriority: -100\n" in query
    assert "Value: /usr/bin/busybox\n" in _update_alternatives(target, "--query", "awk")
    # Laid out again: nothing changes.
    entries = {n: (db / n).read_text() for n in ("awk", "editor")}
    assert altmerge.merge_component_alternatives(target, "db") == []
    assert {n: (db / n).read_text() for n in ("awk", "editor")} == entries


def test_a_candidate_the_component_did_not_place_is_not_added(tmp_path: Path) -> None:
    """db from another image, without vim (the OS image's record lists it): update-
    alternatives would refuse a candidate that is not there, and so does the merge."""
    gold, target, shared = _os_target(tmp_path)
    db = target / "var/lib/dpkg/alternatives"
    editor = (db / "editor").read_text()
    without_vim = [p for p in DB_FILES if "vim" not in p]
    assert _lay_out(gold, target, shared, tmp_path, files=without_vim) == []
    assert (db / "awk").read_text() == AWK and (db / "editor").read_text() == editor
    assert os.readlink(target / "etc/alternatives/editor") == "/usr/bin/nano"


def test_no_record_is_written_through_a_symlink_in_the_staged_tree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gold whose /var/lib/bootenv is a symlink (a layout refuses such a root): the OS
    view is written, the records are not, there nor where the link points."""
    gold = shared_gold(tmp_path / "gold")
    _, split, shared = _planned(gold)
    target, elsewhere = tmp_path / "target", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    stage(gold, sorted({*split.dirs[OS], *split.files[OS]}), target, tmp_path)
    os.symlink(elsewhere, target / "var/lib/bootenv")
    altmerge.write_os_view(target, shared)
    assert os.readlink(target / "etc/alternatives/editor") == "/usr/bin/nano"
    assert list(elsewhere.iterdir()) == []
    assert "the alternatives records of db are not written" in caplog.text
