"""The dpkg status merge never leaves the root, whatever symlink an archive planted."""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bootenv import dpkgmerge
from bootenv.dpkgmerge import merge_component_status
from bootenv.errors import RetryableError
from bootenv.layout import LayoutConfig, layout
from bootenv.paxread import ArchiveError
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image, sym

PARAGRAPH = "Package: pwned\nStatus: install ok installed\nVersion: 1\n"


def test_a_dpkg_directory_the_archive_made_a_symlink_fails_its_component(tmp_path: Path) -> None:
    """The target has no /var/lib/dpkg yet: the archive's symlink there is placed, and
    the merge would write the status file wherever it points."""
    (tmp_path / "outside").mkdir()
    evil = Comp(
        "evil",
        [d("var"), d("var/lib"), sym("var/lib/dpkg", "../../../outside")],
        units=("evil.service",),
        status=PARAGRAPH,
    )
    good = Comp("good", [d("srv"), f("srv/ok", "fine")], units=("good.service",))
    image = make_image(tmp_path / "img", [evil, good])
    root = tmp_path / "root"
    root.mkdir()
    act = ActivatedUnits()
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=act)
    assert os.listdir(tmp_path / "outside") == []
    by_name = {c.name: c for c in res.components}
    assert by_name["evil"].status == "failed" and by_name["evil"].packages == ()
    assert (
        by_name["evil"].error
        == "dpkg status not merged: refused: /var/lib/dpkg is a symlink or not a directory"
    )
    assert by_name["good"].status == "done"
    assert act.units == ["good.service"]  # the refused component is not activated
    failure = res.failure()
    assert failure is not None and "\n" not in str(failure) and "evil: dpkg status not merged" in str(failure)


def _component_status(root: Path, text: str) -> None:
    (root / "var/lib/bootenv/dpkg").mkdir(parents=True)
    (root / "var/lib/bootenv/dpkg/c.status").write_text(text)


@pytest.mark.parametrize("planted", ["var/lib/dpkg", "var/lib", "var"])
def test_the_status_file_is_written_through_no_symlinked_directory(tmp_path: Path, planted: str) -> None:
    root = tmp_path / "root"
    _component_status(root, PARAGRAPH)
    outside = tmp_path / "outside"
    outside.mkdir()
    if planted != "var":
        (root / planted).parent.mkdir(parents=True, exist_ok=True)
    target = root / planted
    if target.exists():  # var and var/lib hold the component's status: move them out
        os.rename(target, outside / "moved")
        os.symlink(outside / "moved", target)
    else:
        os.symlink(outside, target)
    with pytest.raises(ArchiveError, match=r"^refused: /var(/lib)?(/dpkg)? is a symlink or not a directory$"):
        merge_component_status(root, "c")
    assert not any(p.name == "status" for p in outside.rglob("*"))


def test_a_symlinked_status_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _component_status(root, PARAGRAPH)
    (root / "var/lib/dpkg").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, root / "var/lib/dpkg/status")
    with pytest.raises(ArchiveError, match=r"^refused: /var/lib/dpkg/status is a symlink$"):
        merge_component_status(root, "c")
    assert victim.read_text() == "precious\n"


def test_the_component_status_is_not_read_through_a_symlink(tmp_path: Path) -> None:
    """Its paragraphs come from the component's own file, never one a symlink points at."""
    root = tmp_path / "root"
    (root / "var/lib/bootenv").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.status").write_text(PARAGRAPH)
    os.symlink(elsewhere, root / "var/lib/bootenv/dpkg")
    with pytest.raises(
        ArchiveError, match=r"^refused: /var/lib/bootenv/dpkg is a symlink or not a directory$"
    ):
        merge_component_status(root, "c")
    assert not (root / "var/lib/dpkg/status").exists()


BASE = (
    "Package: base\nStatus: install ok installed\nPriority: required\nMaintainer: x <x@y>\n"
    "Architecture: all\nVersion: 1\nDescription: b\n"
)
ADDED = (
    "Package: added\nStatus: install ok installed\nPriority: optional\nMaintainer: x <x@y>\n"
    "Architecture: all\nVersion: 2\nDescription: a\n"
)


def _held(admindir: Path) -> bool:
    """Whether another process holds dpkg's lock (a lock this process got is let go)."""
    fd = os.open(admindir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _dpkg_root(tmp_path: Path) -> tuple[Path, Path]:
    """A root whose dpkg database lists BASE, with a component's ADDED to merge: it and
    its dpkg directory."""
    root = tmp_path / "root"
    admindir = root / "var/lib/dpkg"
    (admindir / "updates").mkdir(parents=True)
    (admindir / "status").write_text(BASE)
    _component_status(root, ADDED)
    return root, admindir


class RunningDpkg:
    """A real dpkg that holds its locks while it reads selections from its stdin."""

    def __init__(self, admindir: Path) -> None:
        self.proc = subprocess.Popen(
            ["dpkg", f"--admindir={admindir}", "--set-selections"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not _held(admindir):
            assert self.proc.poll() is None and time.monotonic() < deadline, "dpkg never took its lock"
            time.sleep(0.01)

    def finish(self) -> None:
        """dpkg writes its database (from what it read when it started) and exits."""
        _, err = self.proc.communicate(b"base hold\n", timeout=30)
        assert self.proc.returncode == 0, err


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg on this machine")
def test_the_merge_waits_for_a_running_dpkg_and_neither_loses_the_others_work(
    tmp_path: Path, allow_run: None
) -> None:
    root, admindir = _dpkg_root(tmp_path)
    dpkg = RunningDpkg(admindir)
    merging = concurrent.futures.ThreadPoolExecutor(1).submit(merge_component_status, root, "c")
    try:
        assert "added" not in (admindir / "status").read_text()  # not merged under dpkg's feet
        assert not merging.done()
    finally:
        dpkg.finish()
    assert merging.result(timeout=30) == ["added"]
    status = (admindir / "status").read_text()
    assert "Package: added\n" in status  # dpkg's write did not drop the merged package ...
    assert "Package: base\nStatus: hold ok installed\n" in status  # ... nor the merge dpkg's
    assert not _held(admindir)  # and the merge let go of the locks


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg on this machine")
def test_a_lock_held_too_long_fails_the_merge_retryably_and_changes_nothing(
    tmp_path: Path, allow_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, admindir = _dpkg_root(tmp_path)
    monkeypatch.setattr(dpkgmerge, "LOCK_WAIT", 0.2)
    dpkg = RunningDpkg(admindir)
    try:
        with pytest.raises(RetryableError, match=r"dpkg's database stayed locked .*lock-frontend\) for 0 s"):
            merge_component_status(root, "c")
        assert (admindir / "status").read_text() == BASE
    finally:
        dpkg.finish()
