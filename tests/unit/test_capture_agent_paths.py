"""A gold whose image the agent could not configure (a path it writes, /etc/ssh or
/opt/bootenv, that cannot be resolved inside the image) is refused by capture, in the
line the agent would give once the disk is written, before anything is packed. What
counts is the image's own tree: not an excluded path, a component's, or what is
mounted on the gold."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bootenv.capture as capture_mod
from bootenv.assign import plan_split
from bootenv.capture import CaptureConfig, capture
from bootenv.cli import main
from bootenv.dpkg import read_database
from bootenv.errors import UserError
from bootenv.exclude import Exclusions
from bootenv.split import ComponentSpec
from bootenv.walk import Kind, scan
from tests.unit.fakeroot import make_tree

SPECS = (ComponentSpec("web", ("httpd",)),)
LOOP = (
    "the OS image's /etc/ssh cannot be resolved inside it: a symlink loop at /etc/ssh "
    "(more than 40 links followed)"
)


class _PackedError(Exception):
    """What capture raises here once it would pack: the gold got past the check."""


@pytest.fixture
def packing(monkeypatch: pytest.MonkeyPatch) -> None:
    def packed(*_: object, **__: object) -> None:
        raise _PackedError

    monkeypatch.setattr(capture_mod, "_pack_all", packed)


def _gold(tmp_path: Path) -> Path:
    gold = make_tree(tmp_path / "gold")
    os.symlink("/etc/ssh", gold / "etc/ssh")  # absolute: a loop inside the gold, not the host's
    return gold


@pytest.mark.usefixtures("packing")
def test_a_symlink_loop_where_the_agent_writes_is_refused_before_anything_is_packed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gold = _gold(tmp_path)
    out = tmp_path / "images/web"
    assert main(["capture", str(gold), "-o", str(out), "--component", "web=httpd"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"bootenv: error: {LOOP} (hint: fix that symlink on the gold machine and capture it again)"
    )
    assert "Traceback" not in err and err.count("error") == 1
    assert list((tmp_path / "images").iterdir()) == []  # no partial output left


@pytest.mark.usefixtures("packing")
def test_a_link_through_a_file_is_refused_and_an_excluded_loop_is_not(tmp_path: Path) -> None:
    gold = _gold(tmp_path)
    (gold / "etc/ssh").unlink()
    os.symlink("/etc/hostname/opt", gold / "opt")
    with pytest.raises(UserError) as caught:
        capture(CaptureConfig(root=gold, output=tmp_path / "out", components=SPECS))
    assert caught.value.message == (
        "the OS image's /opt/bootenv cannot be resolved inside it: it leads to "
        "/etc/hostname/opt/bootenv, and /etc/hostname is not a directory"
    )
    # Left out of the image, the link is not the agent's concern: capture goes on.
    with pytest.raises(_PackedError):
        capture(CaptureConfig(root=gold, output=tmp_path / "out", components=SPECS, excludes=("/opt",)))


@pytest.mark.usefixtures("packing")
def test_a_components_link_counts_only_for_the_single_image(tmp_path: Path) -> None:
    """/opt given to a component is not in the OS sub-image the agent writes, but is in
    the single image, which it writes with bootenv.single."""
    gold = _gold(tmp_path)
    (gold / "etc/ssh").unlink()
    os.symlink("/etc/hostname/opt", gold / "opt")
    specs = (ComponentSpec("web", ("httpd",), ("/opt",)),)
    with pytest.raises(_PackedError):
        capture(CaptureConfig(root=gold, output=tmp_path / "out", components=specs))
    with pytest.raises(UserError, match=r"^the OS image's /opt/bootenv cannot be resolved inside it"):
        capture(CaptureConfig(root=gold, output=tmp_path / "out", components=specs, single=True))


def test_what_is_mounted_on_the_gold_is_not_the_images(tmp_path: Path) -> None:
    """The scan does not descend into a mount point, and the image has it as an empty
    directory: a loop in the filesystem mounted on /etc is not in it."""
    gold = _gold(tmp_path)
    entries = scan(gold)
    split = plan_split(read_database(gold), SPECS, entries, Exclusions())
    with pytest.raises(UserError) as caught:
        capture_mod._check_agent_paths(entries, split, single=False)
    assert caught.value.message == LOOP
    # As the scan lists /etc when a filesystem is mounted there.
    mounted = [e for e in entries if not e.path.startswith("/etc/")]
    assert [e.kind for e in mounted if e.path == "/etc"] == [Kind.DIR]
    split = plan_split(read_database(gold), SPECS, mounted, Exclusions())
    capture_mod._check_agent_paths(mounted, split, single=True)
