"""A gold whose /var (or /var/lib/dpkg) is a symlink: capture reads and rewrites its dpkg
database inside the tree, never through the link onto the host or the gold itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bootenv.assign import plan_split
from bootenv.capture_pack import _rewrite_status
from bootenv.dpkg import read_database
from bootenv.errors import FatalError, UserError
from bootenv.exclude import Exclusions
from bootenv.intree import MAX_LINK_HOPS, disk_links, resolve
from bootenv.split import OS, ComponentSpec
from bootenv.walk import scan
from tests.unit.fakeroot import make_tree

SPECS = (ComponentSpec("web", ("httpd",)),)


def _var_elsewhere(tmp_path: Path) -> Path:
    """The fake gold with its /var moved to /data/var, and /var -> /data/var (absolute)."""
    gold = make_tree(tmp_path / "gold")
    (gold / "data").mkdir()
    (gold / "var").rename(gold / "data/var")
    os.symlink("/data/var", gold / "var")
    return gold


def test_resolving_never_leaves_the_tree(tmp_path: Path) -> None:
    gold = _var_elsewhere(tmp_path)
    os.symlink("../../../../etc", gold / "data/up")
    links = disk_links(gold)
    assert resolve("/var/lib/dpkg/status", links) == "/data/var/lib/dpkg/status"
    assert resolve("/data/up/passwd", links) == "/etc/passwd"  # `..` stops at the root
    assert resolve("/var", links, last=False) == "/var"


def test_the_source_is_read_inside_the_tree(tmp_path: Path) -> None:
    from bootenv.capture import _source

    gold = _var_elsewhere(tmp_path)
    (gold / "usr/lib/modules/6.1.0-9-amd64").mkdir(parents=True)
    (gold / "lib").unlink()
    os.symlink("/usr/lib", gold / "lib")  # absolute: the host's /usr/lib is not the gold's
    (gold / "usr/lib/os-release").write_text('PRETTY_NAME="Gold Linux"\n')
    os.symlink("/usr/lib/os-release", gold / "etc/os-release")
    source = _source(gold, read_database(gold))
    assert (source.kernel, source.os_release, source.hostname) == ("6.1.0-9-amd64", "Gold Linux", "fakegold")


def test_the_database_is_read_through_a_symlinked_var_inside_the_tree(tmp_path: Path) -> None:
    gold = _var_elsewhere(tmp_path)
    db = read_database(gold)
    assert "httpd" in db.packages and "/usr/sbin/httpd" in db.files["httpd-bin"]
    assert "/var/lib/dbdata" in db.script_paths["dbserver"]


def test_the_split_finds_dpkgs_files_where_the_symlinked_var_puts_them(tmp_path: Path) -> None:
    gold = _var_elsewhere(tmp_path)
    split = plan_split(read_database(gold), SPECS, scan(gold), Exclusions())
    assert split.image_of("/data/var/lib/dpkg/status") == OS
    assert split.image_of("/data/var/lib/dpkg/info/httpd.list") == "web"
    assert split.image_of("/data/var/lib/dpkg/info/curl.list") == OS


def _staged(tmp_path: Path, gold: Path, var_target: str) -> Path:
    """A staged OS tree as the hard-link farm makes it of a gold whose /var is a link to
    /data/var: the gold's status linked, and the /var symlink as it is (`var_target`)."""
    staging = tmp_path / "staging"
    (staging / "data/var/lib/dpkg").mkdir(parents=True)
    os.link(gold / "var/lib/dpkg/status", staging / "data/var/lib/dpkg/status")
    os.symlink(var_target, staging / "var")
    return staging


def test_the_status_is_rewritten_inside_the_staged_tree(tmp_path: Path) -> None:
    gold = make_tree(tmp_path / "gold")
    db = read_database(gold)
    before = (gold / "var/lib/dpkg/status").read_bytes()
    os.chmod(gold / "var/lib/dpkg/status", 0o640)
    staging = _staged(tmp_path, gold, "/data/var")
    _rewrite_status(staging, db, ("dpkg", "libc6"))
    staged = staging / "data/var/lib/dpkg/status"
    text = staged.read_text()
    assert "Package: dpkg\n" in text and "Package: httpd\n" not in text
    assert "Package: gone\n" in text  # a not-installed record stays with the OS
    assert staged.stat().st_mode & 0o7777 == 0o640
    assert staged.stat().st_mtime_ns == (gold / "var/lib/dpkg/status").stat().st_mtime_ns
    assert (gold / "var/lib/dpkg/status").read_bytes() == before  # the link was replaced
    assert sorted(p.name for p in staged.parent.iterdir()) == ["status"]


def test_the_status_is_never_written_through_a_link_out_of_the_staged_tree(tmp_path: Path) -> None:
    """The staged /var points, absolutely, at a real database outside the staged tree
    (on a live ROOT=/, the gold's own): it is left alone, and the capture fails."""
    gold = make_tree(tmp_path / "gold")
    db = read_database(gold)
    outside = tmp_path / "outside/var"
    shutil.copytree(gold / "var/lib/dpkg", outside / "lib/dpkg", symlinks=True)
    before = (outside / "lib/dpkg/status").read_bytes()
    staging = _staged(tmp_path, gold, str(outside))
    with pytest.raises(FatalError, match="vanished from the staged tree"):
        _rewrite_status(staging, db, ("dpkg",))
    assert (outside / "lib/dpkg/status").read_bytes() == before
    assert sorted(p.name for p in (outside / "lib/dpkg").iterdir()) == ["alternatives", "info", "status"]


def test_a_link_chain_too_long_to_resolve_is_refused_not_followed(tmp_path: Path) -> None:
    gold = make_tree(tmp_path / "gold")
    db = read_database(gold)
    outside = tmp_path / "outside/var"
    shutil.copytree(gold / "var/lib/dpkg", outside / "lib/dpkg", symlinks=True)
    before = (outside / "lib/dpkg/status").read_bytes()
    staging = _staged(tmp_path, gold, "/l0")
    for i in range(MAX_LINK_HOPS):  # /var -> /l0 -> /l1 ... -> /l40 -> outside
        os.symlink(f"/l{i + 1}", staging / f"l{i}")
    os.symlink(str(outside), staging / f"l{MAX_LINK_HOPS}")
    with pytest.raises(
        FatalError, match=r"status is not written in the staged tree: refused: /l\d+ is a symlink"
    ):
        _rewrite_status(staging, db, ("dpkg",))
    assert (outside / "lib/dpkg/status").read_bytes() == before


# What the gold's /var holds besides the fake gold's own: a cache of db's (its, where the
# admin names it), then machine identity, caches, runtime state and a provisioned
# machine's bootenv records, left out on purpose.
_VAR_STATE = (
    "cache/dbcache/index",
    "lib/systemd/random-seed",
    "lib/systemd/credential.secret",
    "lib/dhcp/dhclient.eth0.leases",
    "cache/apt/pkgcache.bin",
    "tmp/scratch",
    "lib/bootenv/layout/journal.json",
)


def _with_var_state(gold: Path, var: str) -> Path:
    for rel in _VAR_STATE:
        (gold / var / rel).parent.mkdir(parents=True, exist_ok=True)
        (gold / var / rel).write_text(rel)
    return gold


@pytest.mark.parametrize("paths", [(), ("/var/lib/dbdata", "/var/cache/dbcache")])
def test_a_symlinked_var_splits_and_excludes_as_a_plain_one(tmp_path: Path, paths: tuple[str, ...]) -> None:
    """Every path of the gold whose /var is a link to /data/var lands where the same path
    of the plain gold does, or is left out for the same reason: logs, identity, caches,
    bootenv's state; db's data by its postinst (rule 4) or by the admin's /PATH (its
    cache, which no script names)."""
    specs = (ComponentSpec("web", ("httpd",)), ComponentSpec("db", ("dbserver",), paths))
    plain = _with_var_state(make_tree(tmp_path / "plain"), "var")
    linked = _with_var_state(_var_elsewhere(tmp_path), "data/var")

    def where(gold: Path, prefix: str) -> dict[str, str | None]:
        split = plan_split(read_database(gold), specs, scan(gold), Exclusions())
        placed: dict[str, str | None] = {p: image for image, ps in split.files.items() for p in ps}
        placed.update({p: f"excluded: {reason}" for p, reason in split.excluded})
        return {p.replace(prefix, "/var/", 1) if p.startswith(prefix) else p: w for p, w in placed.items()}

    got, want = where(linked, "/data/var/"), where(plain, "/var/")
    assert got.pop("/var") == OS  # the link itself
    assert got == want
    assert want["/var/lib/dbdata/ibdata1"] == "db" and want["/var/log/httpd/access.log"] == "excluded: logs"
    assert want["/var/cache/dbcache/index"] == ("db" if paths else OS)
    for rel in _VAR_STATE[1:]:
        assert str(want["/var/" + rel]).startswith("excluded: "), rel


def test_a_components_path_is_found_where_the_gold_puts_it_never_on_the_host(tmp_path: Path) -> None:
    from bootenv.capture import _refuse_bad_specs

    gold = _var_elsewhere(tmp_path)
    db = read_database(gold)
    _refuse_bad_specs(gold, db, (ComponentSpec("db", ("dbserver",), ("/var/lib/dbdata",)),))
    host = tmp_path / "host-only"
    (host / "data").mkdir(parents=True)
    (gold / "srv").mkdir()
    os.symlink(str(host), gold / "srv/link")  # absolute: the gold's own path, not the host's
    with pytest.raises(UserError, match=rf"^component db: /srv/link/data is not in {gold}$"):
        _refuse_bad_specs(gold, db, (ComponentSpec("db", ("dbserver",), ("/srv/link/data",)),))


def _datadir_moved(tmp_path: Path, target: str) -> Path:
    """The fake gold with db's data directory moved to `target` and linked from where
    dbserver's postinst names it (/var/lib/dbdata -> target, absolute)."""
    gold = make_tree(tmp_path / "gold")
    (gold / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(gold / "var/lib/dbdata", gold / target.lstrip("/"))
    os.symlink(target, gold / "var/lib/dbdata")
    return gold


@pytest.mark.parametrize("paths", [(), ("/var/lib/dbdata",)])
def test_a_data_directory_moved_behind_a_link_goes_with_its_component(
    tmp_path: Path, paths: tuple[str, ...]
) -> None:
    gold = _datadir_moved(tmp_path, "/srv/dbdata")
    specs = (ComponentSpec("db", ("dbserver",), paths),)
    split = plan_split(read_database(gold), specs, scan(gold), Exclusions())
    assert split.image_of("/var/lib/dbdata") == "db"
    assert split.image_of("/srv/dbdata/ibdata1") == "db"
    assert "/srv/dbdata" in split.dirs["db"] and "/srv" in split.dirs[OS]


def test_a_link_to_packages_files_takes_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link named by a component's scripts that leads to a directory holding packages'
    files (/usr/lib): following it would take every unowned file there."""
    gold = make_tree(tmp_path / "gold")
    shutil.rmtree(gold / "var/lib/dbdata")
    os.symlink("/usr/lib", gold / "var/lib/dbdata")
    (gold / "usr/lib/unowned.so").write_text("the admin's")
    with caplog.at_level("WARNING"):
        split = plan_split(
            read_database(gold), (*SPECS, ComponentSpec("db", ("dbserver",))), scan(gold), Exclusions()
        )
    assert split.image_of("/var/lib/dbdata") == "db"
    assert split.image_of("/usr/lib/unowned.so") == OS and split.image_of("/usr/lib/libdb.so") == "db"
    assert split.image_of("/usr/lib/libc.so.6") == OS
    assert "/var/lib/dbdata, named by dbserver's maintainer scripts, is a link to /usr/lib" in caplog.text
