"""Conflict records are read back from the disk they describe: a damaged or forged one
is refused (one line, exit 2) before `conflicts` shows it or `resolve` acts on its
paths, and a resolution never follows a symlink out of the root."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bootenv.cli import main
from bootenv.conflicts import RECORDS, STORE, conflict_id
from tests.unit.resolvekit import stop_at

CID = conflict_id("c", "etc/f")


def _record(root: Path, **change: Any) -> Path:
    doc: dict[str, Any] = {
        "id": CID,
        "component": "c",
        "path": "etc/f",
        "reason": "differs",
        "existing": {},
        "incoming": {},
        "stored": f"{STORE}/c/etc/f",
        "resolution": None,
    }
    doc.update(change)
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    path = root / RECORDS / f"{CID}.json"
    path.write_text(json.dumps(doc))
    return path


def _tree(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/f").write_text("existing\n")
    (root / STORE / "c/etc").mkdir(parents=True)
    (root / STORE / "c/etc/f").write_text("incoming\n")
    (tmp / "victim").mkdir()
    (tmp / "victim/file").write_text("victim\n")
    return root


def _one_error(capsys: pytest.CaptureFixture[str], words: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bootenv: error:") and words in err, err
    assert "Traceback" not in err


DAMAGED: dict[str, dict[str, Any]] = {
    "resolution not a dict": {"resolution": "notadict"},
    "resolution holding a number": {"resolution": {"keep": 1}},
    "path a number": {"path": 5},
    "existing a list": {"existing": []},
    "path absolute": {"path": "/etc/passwd"},
    "path going up": {"path": "../victim/file"},
    "path with an empty part": {"path": "etc//f"},
    "stored going up": {"stored": "../victim"},
    "stored going up from the store": {"stored": f"{STORE}/c/../../../../../victim/file"},
    "stored another component's": {"stored": f"{STORE}/d/etc/f"},
    "stored outside the store": {"stored": "etc/f"},
    "component not a name": {"component": "../c"},
    "id not the record's": {"id": "0123456789ab"},
    "an unknown field": {"extra": 1},
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
@pytest.mark.parametrize("action", ["list", "resolve"])
def test_a_damaged_record_is_refused_and_nothing_is_touched(
    case: str, action: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    _record(root, **DAMAGED[case])
    argv = ["conflicts", "list"] if action == "list" else ["conflicts", "resolve", CID, "--keep", "existing"]
    assert main([*argv, "--root", str(root)]) == 2
    _one_error(capsys, "is damaged")
    assert (tmp_path / "victim/file").read_text() == "victim\n"
    assert (root / STORE / "c/etc/f").read_text() == "incoming\n"


@pytest.mark.parametrize("keep", ["existing", "incoming", "merged"])
@pytest.mark.parametrize("where", ["etc", f"{STORE}/c/etc"])
def test_resolve_never_follows_a_symlinked_directory_out_of_the_root(
    keep: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    _record(root)
    moved = root / where
    (moved / "f").unlink()
    moved.rmdir()
    moved.symlink_to(tmp_path / "victim")
    (tmp_path / "victim/f").write_text("outside\n")
    assert main(["conflicts", "resolve", CID, "--keep", keep, "--root", str(root)]) == 2
    _one_error(capsys, "symlink")
    assert (tmp_path / "victim/f").read_text() == "outside\n"
    assert (tmp_path / "victim/file").read_text() == "victim\n"


def test_show_does_not_diff_a_file_reached_through_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    _record(root)
    (root / "etc/f").unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(tmp_path / "victim")
    (tmp_path / "victim/f").write_text("secret\n")
    assert main(["conflicts", "show", CID, "--root", str(root)]) == 0
    assert "secret" not in capsys.readouterr().out


def test_an_incoming_directory_over_a_symlink_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    _record(root)
    (root / "etc/f").unlink()
    (root / "etc/f").symlink_to(tmp_path / "victim")
    (root / STORE / "c/etc/f").unlink()
    (root / STORE / "c/etc/f").mkdir()
    assert main(["conflicts", "resolve", CID, "--keep", "incoming", "--root", str(root)]) == 2
    _one_error(capsys, "is a directory and the existing one is not")
    assert (root / "etc/f").is_symlink()
    (root / "etc/f").unlink()  # as the hint says: then it is put in place
    assert main(["conflicts", "resolve", CID, "--keep", "incoming", "--root", str(root)]) == 0
    assert (root / "etc/f").is_dir() and not (root / STORE / "c/etc/f").exists()


@pytest.mark.parametrize("keep", ["existing", "incoming", "merged"])
def test_a_sound_record_still_resolves(keep: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _record(root)
    assert main(["conflicts", "resolve", CID, "--keep", keep, "--root", str(root)]) == 0
    want = {"existing": "existing\n", "incoming": "incoming\n"}.get(keep)
    got = (root / "etc/f").read_text()
    assert got == want if want else ("existing" in got and "incoming" in got)
    assert not (root / STORE / "c/etc/f").exists()
    assert json.loads((root / RECORDS / f"{CID}.json").read_text())["resolution"]["keep"] == keep


def test_list_and_show_print_a_path_with_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path is an archive member's name, which may hold any byte but NUL and "/": an
    escape sequence in it must not reach the admin's terminal."""
    root = _tree(tmp_path)
    path = "etc/f\x1b]0;owned\x07"
    cid = conflict_id("c", path)
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    doc = {
        "id": cid,
        "component": "c",
        "path": path,
        "reason": "differs\x1b[2J",
        "existing": {},
        "incoming": {},
        "stored": f"{STORE}/c/{path}",
        "resolution": None,
    }
    (root / RECORDS / f"{cid}.json").write_text(json.dumps(doc))
    for argv in (["conflicts", "list", "--root", str(root)], ["conflicts", "show", cid, "--root", str(root)]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out
        assert "/etc/f\\x1b]0;owned\\x07" in out and "differs\\x1b[2J" in out


def test_list_and_show_print_a_name_that_is_not_utf8_or_holds_a_newline_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte that is not UTF-8 is shown as `\\xe9` (it was `\\udce9`, the surrogate it is
    read as), and a newline as `\\n`: in the table, the header and the diff's file names."""
    root = _tree(tmp_path)
    path = os.fsdecode(b"etc/caf\xe9\nx.conf")
    cid = conflict_id("c", path)
    (root / RECORDS).mkdir(parents=True, exist_ok=True)
    stored = f"{STORE}/c/{path}"
    (root / path).write_text("a = 1\n")
    (root / stored).write_text("a = 2\n")
    doc = {
        "id": cid,
        "component": "c",
        "path": path,
        "reason": "different content",
        "existing": {},
        "incoming": {},
        "stored": stored,
        "resolution": None,
    }
    (root / RECORDS / f"{cid}.json").write_text(json.dumps(doc))
    shown = "etc/caf\\xe9\\nx.conf"
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and f"/{shown}" in table[2]
    assert main(["conflicts", "show", cid, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\\udc" not in out
    lines = out.splitlines()
    assert lines[0] == f"conflict {cid}: /{shown} from component c (different content)"
    assert f"incoming (kept in /{STORE}/c/{shown})" in out
    assert f"--- existing/{shown}" in lines and f"+++ c/{shown}" in lines
    assert "-a = 1" in lines and "+a = 2" in lines


def test_a_conflict_a_killed_resolve_left_is_listed_as_stopped_until_it_is_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed after its intent and the merge, before the stored version went and the
    record was written: the record is still open, but `list` and `show` say which
    resolve to run again (the one that finishes it; another is refused)."""
    root = _tree(tmp_path)
    _record(root)

    stop_at(monkeypatch, "remove_at", root, CID, "merged", None)
    assert (root / "etc/f").read_text() == "existing\nincoming\n"
    listing = ["conflicts", "list", "--root", str(root)]
    assert main(listing) == 0
    (row,) = capsys.readouterr().out.splitlines()[2:]
    assert row.split(None, 4)[4] == "open (resolve --keep merged stopped: run it again)"
    assert main([*listing, "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["resolution"], doc["stopped"]) == (None, "--keep merged")
    assert main(["conflicts", "show", CID, "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "a resolve --keep merged was stopped before it ended: run it again to finish it"
    assert main(["conflicts", "resolve", CID, "--keep", "merged", "--root", str(root)]) == 0
    capsys.readouterr()
    assert main([*listing, "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["resolution"]["keep"], doc["stopped"]) == ("merged", None)
    assert (root / "etc/f").read_text() == "existing\nincoming\n"
    assert main(listing) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith(" merged")


def test_an_open_conflict_no_resolve_was_stopped_on_is_listed_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    _record(root)
    assert main(["conflicts", "list", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith(" open")
    assert main(["conflicts", "list", "--json", "--root", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["stopped"] is None
