"""Capture's pure helpers: --auto proposals and quiescing (with a recording run helper)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from bootenv import run as run_mod
from bootenv.assign import plan_split
from bootenv.capture import _quiesced, propose_components, split_warnings
from bootenv.dpkg import Diversion, parse_diversions, read_database, read_diversions
from bootenv.errors import FatalError, UserError
from bootenv.exclude import Exclusions
from bootenv.split import ComponentSpec
from bootenv.walk import Entry, Kind, scan
from tests.unit.fakeroot import make_tree


def test_auto_proposes_service_packages_outside_the_base(tmp_path: Path) -> None:
    db = read_database(make_tree(tmp_path / "g"))
    names = {(s.name, s.packages) for s in propose_components(db, ())}
    assert names == {("httpd", ("httpd",)), ("dbserver", ("dbserver",))}


class _Systemctl:
    """A recording run helper: `systemctl is-active` answers for the `active` services."""

    def __init__(self, active: set[str]) -> None:
        self.active = active
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **_: object) -> object:
        self.calls.append(argv[1:])
        code = 3 if argv[1] == "is-active" and argv[-1] not in self.active else 0

        class Done:
            returncode = code
            stdout = b""
            stderr = b""

        return Done()


def test_quiesce_stops_and_always_restarts_what_was_running(monkeypatch: pytest.MonkeyPatch) -> None:
    systemctl = _Systemctl(active={"mariadb", "apache2"})
    monkeypatch.setattr(run_mod, "_spawn", systemctl)
    with pytest.raises(FatalError), _quiesced(("mariadb", "cron", "apache2")):
        raise FatalError("disk full")
    assert systemctl.calls == [
        ["is-active", "--quiet", "mariadb"],
        ["stop", "mariadb"],
        ["is-active", "--quiet", "cron"],  # stopped by the admin: not started after
        ["stop", "cron"],
        ["is-active", "--quiet", "apache2"],
        ["stop", "apache2"],
        ["start", "apache2"],
        ["start", "mariadb"],
    ]


def test_the_services_are_stopped_before_the_tree_is_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the scan lists is what the stopped services left: a file a service writes as
    it stops is in the capture, and none it removes is missing from it."""
    import bootenv.capture as capture_mod

    db = read_database(make_tree(tmp_path / "gold"))
    systemctl = _Systemctl(active={"mariadb"})
    monkeypatch.setattr(run_mod, "_spawn", systemctl)
    monkeypatch.setattr(capture_mod, "read_database", lambda root: db)

    def scan(root: Path) -> object:
        systemctl.calls.append(["(scan)", str(root)])
        raise FatalError("scanned")

    monkeypatch.setattr(capture_mod, "scan", scan)
    out = tmp_path / "images/lamp"
    with pytest.raises(FatalError, match=r"^scanned$"):
        capture_mod.capture(capture_mod.CaptureConfig(root=Path("/"), output=out, stop_services=("mariadb",)))
    assert systemctl.calls == [
        ["is-active", "--quiet", "mariadb"],
        ["stop", "mariadb"],
        ["(scan)", "/"],
        ["start", "mariadb"],
    ]
    assert list((tmp_path / "images").iterdir()) == []


def test_the_recorded_kernel_is_the_newest_by_version(tmp_path: Path) -> None:
    from bootenv.capture import _source
    from bootenv.dpkg import Database

    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"):
        (tmp_path / "lib/modules" / version).mkdir(parents=True)
    assert _source(tmp_path, Database({}, {}, (), {})).kernel == "6.1.0-10-amd64"


SPECS = (
    ComponentSpec("web", ("httpd",)),
    ComponentSpec("db", ("dbserver",), ("/srv/dbfiles",)),
    ComponentSpec("php", ("modphp",)),
)


def test_a_components_diversion_and_a_mounted_path_are_shown_to_the_admin(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "gold")
    (tree / "srv/dbfiles/disk").mkdir(parents=True)
    info = tree / "var/lib/dpkg/info"
    with open(info / "dbserver.list", "a") as f:
        f.write("/usr/bin/dpkg\n")  # dbserver's wrapper, in dpkg's place
    (tree / "usr/bin/dpkg.distrib").write_bytes(b"dpkg itself")
    diversions = "/usr/bin/dpkg\n/usr/bin/dpkg.distrib\ndbserver\n/etc/x\n/etc/x.orig\n:\n"
    (tree / "var/lib/dpkg/diversions").write_text(diversions)
    db = read_database(tree)
    entries = [replace(e, mountpoint=True) if e.path == "/srv/dbfiles/disk" else e for e in scan(tree)]
    split = plan_split(db, SPECS, entries, Exclusions())
    found = split_warnings(SPECS, entries, read_diversions(tree), split)
    assert len(found) == 2, found
    assert "/srv/dbfiles/disk is a mount point" in found[0]
    assert "diversion of /usr/bin/dpkg (to /usr/bin/dpkg.distrib) by dbserver, of component db" in found[1]
    assert "the os sub-image carries dbserver's /usr/bin/dpkg" in found[1]


def test_diversions_parse_and_a_damaged_list_is_refused() -> None:
    assert parse_diversions("/a\n/a.d\npkg\n/b\n/b.d\n:\n") == (
        Diversion("/a", "/a.d", "pkg"),
        Diversion("/b", "/b.d", None),
    )
    with pytest.raises(UserError, match="damaged"):
        parse_diversions("/a\n/a.d\n")


def test_a_status_paragraph_with_a_byte_not_utf8_reaches_the_targets_database(tmp_path: Path) -> None:
    """A maintainer's name in Latin-1 (read with surrogateescape): the component's status
    fragment keeps the byte, and the layout's merge puts exactly it into the target's
    status."""
    from bootenv.capture_pack import status_fragment
    from bootenv.dpkgmerge import merge_component_status

    gold = make_tree(tmp_path / "gold")
    status = gold / "var/lib/dpkg/status"
    status.write_bytes(
        status.read_bytes().replace(b"Package: httpd\n", b"Package: httpd\nMaintainer: J\xf6rg\n")
    )
    db = read_database(gold)
    frag, rel = status_fragment(tmp_path / "work", "web", [db.packages["httpd"].stanza])
    target = tmp_path / "target"
    (target / rel.lstrip("/")).parent.mkdir(parents=True)
    (target / rel.lstrip("/")).write_bytes((frag / rel.lstrip("/")).read_bytes())
    assert merge_component_status(target, "web") == ["httpd"]
    assert b"Package: httpd\nMaintainer: J\xf6rg\n" in (target / "var/lib/dpkg/status").read_bytes()


def test_an_admin_path_of_the_os_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from bootenv.capture import CaptureConfig, capture

    gold = make_tree(tmp_path / "gold")
    out = tmp_path / "images/web"
    spec = ComponentSpec("web", ("httpd",), ("/usr/bin",))
    with pytest.raises(
        UserError, match=r"^component web: /usr/bin is a path of package base-files, in the OS"
    ):
        capture(CaptureConfig(root=gold, output=out, components=(spec,)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold"]


def _mounted_on(entries: list[Entry], mounts: dict[str, tuple[Entry, ...]]) -> list[Entry]:
    """`entries` with the directories of `mounts` made mount points holding those."""
    out = [replace(e, mountpoint=True, mounted=mounts[e.path]) if e.path in mounts else e for e in entries]
    return out + [
        Entry(p, Kind.DIR, mountpoint=True, mounted=m)
        for p, m in mounts.items()
        if p not in {e.path for e in entries}
    ]


def test_each_mount_point_holding_what_capture_would_take_is_named(tmp_path: Path) -> None:
    """/srv/data holds files the capture would take: named. /proc holds what is excluded
    anyway; the target makes its own ESP; an empty mount loses nothing: not named."""
    tree = make_tree(tmp_path / "gold")
    entries = _mounted_on(
        scan(tree),
        {
            "/proc": (Entry("/proc/1", Kind.DIR), Entry("/proc/self", Kind.SYMLINK)),
            "/srv/data": (Entry("/srv/data/a.db", Kind.FILE), Entry("/srv/data/b.db", Kind.FILE)),
            "/boot/efi": (Entry("/boot/efi/EFI", Kind.DIR),),
            "/mnt/empty": (),
            "/tmp": (Entry("/tmp/x", Kind.FILE),),
        },
    )
    split = plan_split(read_database(tree), SPECS[:1], entries, Exclusions())
    found = split_warnings(SPECS[:1], entries, (), split, Exclusions())
    assert found == [
        "/srv/data is a mount point: what is mounted there (/srv/data/a.db and 1 more) is on another "
        "filesystem and is not captured (capture stays on ROOT's filesystem)"
    ]


def _kernel_on(staging: Path, boot: str) -> None:
    (staging / boot.lstrip("/")).mkdir(parents=True)
    (staging / boot.lstrip("/") / "vmlinuz-6.1.0-9-amd64").write_text("kernel")


_BOOT_MOUNTED = (
    Entry("/boot", Kind.DIR, mountpoint=True, mounted=(Entry("/boot/vmlinuz-6.1.0-9-amd64", Kind.FILE),)),
)


def test_an_os_image_whose_kernel_is_on_a_mounted_boot_is_refused(tmp_path: Path) -> None:
    from bootenv.mounts import check_kernel

    staging = tmp_path / "staging"
    (staging / "boot").mkdir(parents=True)  # the root filesystem's own /boot: empty
    with pytest.raises(UserError) as caught:
        check_kernel(Path("/"), staging, _BOOT_MOUNTED)
    assert caught.value.message == (
        "the OS image has no kernel in /boot (vmlinuz-*): /boot is a mount point, and capture stays on "
        "ROOT's filesystem"
    )
    assert caught.value.hint is not None
    assert (
        "mount --bind / /mnt/gold; cp -a /boot/. /mnt/gold/boot/; bootenv capture /mnt/gold"
        in caught.value.hint
    )
    # /boot below a mounted /data, where /boot -> /data/boot: the same.
    data = (Entry("/data", Kind.DIR, mountpoint=True, mounted=(Entry("/data/boot", Kind.DIR),)),)
    (staging / "boot").rmdir()
    (staging / "boot").symlink_to("/data/boot")
    with pytest.raises(UserError, match=r": /data is a mount point"):
        check_kernel(Path("/gold"), staging, data)


def test_an_os_image_with_its_kernel_passes_and_one_without_any_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bootenv.mounts import check_kernel

    staging = tmp_path / "staging"
    _kernel_on(staging, "/boot")
    check_kernel(Path("/"), staging, _BOOT_MOUNTED)  # a kernel on the root fs as well
    # /boot -> /data/boot (absolute): found inside the staged tree, not on the host.
    other = tmp_path / "other"
    _kernel_on(other, "/data/boot")
    (other / "boot").symlink_to("/data/boot")
    check_kernel(Path("/"), other, ())
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level("WARNING"):
        check_kernel(Path("/"), empty, ())  # no kernel, and none mounted away: a container's tree
        check_kernel(Path("/"), empty, (Entry("/boot", Kind.DIR, mountpoint=True),))  # an empty mount
    no_kernel = (
        "the OS image has no kernel in /boot (vmlinuz-*): a target provisioned with this image will not boot"
    )
    assert caplog.messages == [no_kernel] * 2


def test_a_hard_link_deeper_than_path_max_with_root_in_front_is_kept_with_its_group(tmp_path: Path) -> None:
    """The archive order keeps a hard-linked file's paths together (a chunk never starts
    at a link), read relative to ROOT: ROOT/path would be too long to stat."""
    from bootenv.capture_pack import archive_order
    from tests.unit.test_walk import long_path

    tree = make_tree(tmp_path / "gold")
    deep = "/var/lib/dbdata" + long_path(tree / "var/lib/dbdata") + "/leaf"
    os.link(f"{tree}/var/lib/dbdata/ibdata1", f"{tree}/var/lib/dbdata/zlink", follow_symlinks=False)
    fd = os.open(tree / "var/lib/dbdata", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(deep.removeprefix("/var/lib/dbdata/"), "zz-deep-link", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    split = plan_split(read_database(tree), SPECS[1:2], scan(tree), Exclusions())
    order = archive_order(tree, split, "db")
    assert order.index("/var/lib/dbdata/zz-deep-link") == order.index(deep) + 1
    assert order.index("/var/lib/dbdata/zlink") == order.index("/var/lib/dbdata/ibdata1") + 1
