"""Capture on real trees: the synthetic gold machine and the real LAMP gold machine."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import pytest

from bootenv.capture import CaptureConfig, capture
from bootenv.cli import main
from bootenv.exclude import Exclusions
from bootenv.run import run
from bootenv.split import ComponentSpec
from bootenv.walk import Entry, Kind, scan
from tests.conftest import require_root
from tests.imagetools import archive_members, describe, load, mounted, restore_fs, tree_files
from tests.unit.fakeroot import make_tree
from tests.unit.test_walk import long_path

SPECS = (
    ComponentSpec("web", ("httpd",)),
    ComponentSpec("db", ("dbserver",)),
    ComponentSpec("php", ("modphp",)),
)


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


@pytest.mark.parametrize("scratch", ["memory", "disk"])
def test_synthetic_capture_round_trip(tmp_path: Path, scratch: str) -> None:
    gold = make_tree(tmp_path / "gold", with_socket=True)
    os.chown(gold / "var/lib/dbdata", 999, 998)
    os.chmod(gold / "usr/sbin/dbd", 0o4755)
    os.setxattr(gold / "usr/sbin/httpd", "user.bootenv", b"kept")
    out = tmp_path / "image"
    result = capture(CaptureConfig(root=gold, output=out, components=SPECS, single=True, scratch=scratch))
    m = load(out)
    assert m == result.manifest
    assert [c.name for c in m.components] == ["db", "php", "web"]
    assert m.component("php").depends == ("web",)
    assert "/etc/systemd/system/multi-user.target.wants/httpd.service" in {
        "/" + t.name.lstrip("./") for t in archive_members(out / m.component("web").data.file)
    }
    assert m.component("web").units == ("httpd.service",)
    # Content-addressed: every blob is named by its hash; nothing else is in the dir.
    assert sorted(p.name for p in out.iterdir()) == sorted([b.file for b in m.blobs()] + ["manifest.json"])

    fs = tmp_path / "os.img"
    restore_fs(out, m.os, fs)
    run(["e2fsck", "-fn", fs])
    with mounted(fs, tmp_path / "mnt") as mnt:
        assert describe(mnt / "usr/bin/curl") == describe(gold / "usr/bin/curl")
        assert (mnt / "usr/bin/curl").stat().st_ino == (mnt / "usr/bin/curl-hardlink").stat().st_ino
        assert (mnt / "etc/control.fifo").is_fifo()
        assert not (mnt / "usr/sbin/httpd").exists()  # a component file
        assert not (mnt / "etc/machine-id").exists()  # excluded identity
        assert not (mnt / "etc/agent.sock").exists()  # sockets are skipped
        assert (mnt / "var/log").is_dir() and not (mnt / "var/log/syslog").exists()
        assert os.path.exists(os.fsencode(str(mnt / "etc")) + b"/odd \xff name\nx")
        status = (mnt / "var/lib/dpkg/status").read_text()
        assert "Package: curl\n" in status and "Package: httpd\n" not in status
        assert "Package: gone\n" in status  # not-installed records stay with the OS

    # The setuid bit, the owner and the xattr given to the gold above travel in the
    # component archives (what a layout extracts) ...
    members = {
        "/" + t.name.removeprefix("./"): t for c in m.components for t in archive_members(out / c.data.file)
    }
    assert members["/usr/sbin/dbd"].mode == 0o4755
    assert (members["/var/lib/dbdata"].uid, members["/var/lib/dbdata"].gid) == (999, 998)
    assert members["/usr/sbin/httpd"].pax_headers.get("SCHILY.xattr.user.bootenv") == "kept"

    assert m.single is not None
    restore_fs(out, m.single, tmp_path / "single.img")
    with mounted(tmp_path / "single.img", tmp_path / "mnt2") as mnt:
        assert (mnt / "usr/sbin/httpd").exists()
        assert "Package: httpd\n" in (mnt / "var/lib/dpkg/status").read_text()
        # ... and in the one-piece filesystem image.
        assert stat.S_IMODE((mnt / "usr/sbin/dbd").stat().st_mode) == 0o4755
        dbdata = (mnt / "var/lib/dbdata").stat()
        assert (dbdata.st_uid, dbdata.st_gid) == (999, 998)
        assert os.getxattr(mnt / "usr/sbin/httpd", "user.bootenv") == b"kept"


def test_a_components_units_are_those_its_requires_and_sysv_start_links_enable_too(tmp_path: Path) -> None:
    """A layout holds back, and activation starts, a component's units (hold.py). They
    were only those with a link in a .wants directory: a unit a .requires link enables,
    and a SysV service (an init script and a start link in rc2.d, which
    systemd-sysv-generator makes a unit of) started at the next boot from a half-laid-out
    component. An init script with a native unit of its name is that unit."""
    gold = make_tree(tmp_path / "gold")
    units = gold / "etc/systemd/system"
    (units / "multi-user.target.wants/dbd.service").unlink()
    (units / "multi-user.target.requires").mkdir()
    os.symlink("/lib/systemd/system/dbd.service", units / "multi-user.target.requires/dbd.service")
    for script in ("legacyd", "httpd"):
        (gold / "etc/init.d").mkdir(exist_ok=True)
        (gold / f"etc/init.d/{script}").write_text("#!/bin/sh\n")
        (gold / f"etc/init.d/{script}").chmod(0o755)
        for rc, link in (("rc2.d", f"S01{script}"), ("rc0.d", f"K01{script}")):
            (gold / "etc" / rc).mkdir(exist_ok=True)
            os.symlink(f"../init.d/{script}", gold / "etc" / rc / link)
    specs = (ComponentSpec("web", ("httpd",), ("/etc/init.d/legacyd", "/etc/init.d/httpd")), SPECS[1])
    m = capture(CaptureConfig(root=gold, output=tmp_path / "image", components=specs)).manifest
    assert m.component("web").units == ("httpd.service", "legacyd.service")
    assert m.component("db").units == ("dbd.service",)


def test_existing_output_is_refused_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gold = make_tree(tmp_path / "gold")
    out = tmp_path / "image"
    out.mkdir()
    (out / "keep").write_text("precious")
    code = main(["capture", str(gold), "-o", str(out), "--component", "web=httpd"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"bootenv: error: {out} already exists (hint: pass --force to replace it)"
    ]
    assert (out / "keep").read_text() == "precious"
    # --force replaces an image or an empty directory, never anything else.
    force = ["capture", str(gold), "-o", str(out), "--component", "web=httpd", "--force"]
    assert main(force) == 2
    assert "not a composite image" in capsys.readouterr().err
    assert (out / "keep").read_text() == "precious"
    plain = tmp_path / "plain"
    plain.write_text("precious")
    assert main(["capture", str(gold), "-o", str(plain), "--component", "web=httpd", "--force"]) == 2
    assert plain.read_text() == "precious"
    (out / "keep").unlink()
    assert main(force) == 0  # an empty directory
    (out / "extra").write_text("of the earlier image")
    assert main(force) == 0  # an earlier image, replaced whole
    assert (out / "manifest.json").is_file() and not (out / "extra").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold", "image", "plain"]


def test_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gold = make_tree(tmp_path / "gold")
    out = tmp_path / "image"
    for args, msg in [
        (["--component", "web=htpd"], "is not installed (hint: did you mean httpd, httpd-bin?)"),
        (["--component", "a=httpd", "--component", "b=httpd"], "claimed by both"),
        (["--component", "web=httpd,/srv/no-such-path"], "/srv/no-such-path is not in"),
    ]:
        assert main(["capture", str(gold), "-o", str(out), *args]) == 2
        assert msg in capsys.readouterr().err
    assert main(["capture", str(tmp_path), "-o", str(out)]) == 2
    assert "no dpkg database" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold"]


def test_failure_midway_leaves_no_partial_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gold = make_tree(tmp_path / "gold")
    (gold / "usr/big.bin").write_bytes(os.urandom(6 << 20))  # incompressible
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small])
    try:
        code = main(["capture", str(gold), "-o", str(small / "image"), "--component", "web=httpd"])
        err = capsys.readouterr().err
        assert code != 0
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("bootenv: error: ")
        assert "No space left on device" in err
        assert list(small.iterdir()) == []
    finally:
        run(["umount", small])


@pytest.mark.parametrize("other_fs", [False, True])
def test_a_live_capture_leaves_out_what_was_removed_after_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, other_fs: bool
) -> None:
    """Files removed between the scan and the packing, as on a live machine: an OS file,
    a component's file, and a directory of the OS with its file. The capture succeeds
    without them, says so, and counts only what it packed; the rest is intact. With
    other_fs, the OS tree is staged by a tar copy instead of hard links."""
    import bootenv.capture as capture_mod

    where = tmp_path / "fs"
    where.mkdir()
    if other_fs:  # the gold on another filesystem than the capture's work: no hard links
        run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", where])
    try:
        gold, same = make_tree(where / "gold"), make_tree(tmp_path / "twin")
        for tree in (gold, same):
            (tree / "var/cache/job").mkdir(parents=True)
            (tree / "var/cache/job/tmp").write_text("scratch\n")
        # The same tree, captured unchanged.
        twin = capture(CaptureConfig(root=same, output=tmp_path / "twin-image", components=SPECS)).manifest
        real_scan = capture_mod.scan

        def scan_then_remove(root: Path) -> list[Entry]:
            entries = real_scan(root)
            (gold / "etc/admin-notes.txt").unlink()
            (gold / "usr/sbin/httpd").unlink()
            (gold / "var/cache/job/tmp").unlink()
            (gold / "var/cache/job").rmdir()
            return entries

        monkeypatch.setattr(capture_mod, "scan", scan_then_remove)
        out = tmp_path / "image"
        with caplog.at_level(logging.WARNING):
            result = capture(CaptureConfig(root=gold, output=out, components=SPECS, single=True))
    finally:
        if other_fs:
            run(["umount", where])
    m = load(out)
    assert m == result.manifest
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "os: 3 path(s) removed while the capture read them, left out: " in warned
    assert "/etc/admin-notes.txt" in warned and "/var/cache/job/tmp" in warned
    assert "web: 1 path(s) removed while the capture read them, left out: /usr/sbin/httpd" in warned
    # Counted as packed: the files that went are not (a directory is not counted).
    assert m.component("web").files == twin.component("web").files - 1
    assert m.os.files == twin.os.files - 2
    web = {"/" + t.name.lstrip("./") for t in archive_members(out / m.component("web").data.file)}
    assert "/usr/sbin/httpd" not in web and "/etc/httpd" in web
    restore_fs(out, m.os, tmp_path / "os.img")
    run(["e2fsck", "-fn", tmp_path / "os.img"])
    with mounted(tmp_path / "os.img", tmp_path / "mnt") as mnt:
        assert not (mnt / "etc/admin-notes.txt").exists() and not (mnt / "var/cache/job").exists()
        assert (mnt / "usr/bin/curl").read_bytes() == (tmp_path / "twin/usr/bin/curl").read_bytes()
        assert (mnt / "var/cache").is_dir()


def test_debug_shows_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", str(tmp_path), "-o", str(tmp_path / "o"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_gold_every_file_in_exactly_one_sub_image(gold_tree: Path, gold_image: Path, tmp_path: Path) -> None:
    m = load(gold_image)
    members: dict[str, set[str]] = {}
    for comp in m.components:
        for t in archive_members(gold_image / comp.data.file):
            if not t.isdir():
                members.setdefault("/" + t.name.removeprefix("./"), set()).add(comp.name)
    fs = tmp_path / "os.img"
    restore_fs(gold_image, m.os, fs)
    with mounted(fs, tmp_path / "mnt") as mnt:
        for path in tree_files(mnt):
            if path != "/lost+found":
                members.setdefault(path, set()).add("os")
    rules = Exclusions()
    checked = 0
    for entry in scan(gold_tree):
        if entry.kind is Kind.DIR:
            continue
        homes = members.pop(entry.path, set())
        excluded = rules.reason(entry.path, False) or entry.kind is Kind.SOCKET
        assert len(homes) + bool(excluded) == 1, (entry.path, homes, excluded)
        checked += 1
    # What is left was made by capture: the per-component dpkg status fragments.
    assert set(members) == {f"/var/lib/bootenv/dpkg/{c.name}.status" for c in m.components}
    assert checked > 10000


def xattrs(path: Path) -> dict[str, bytes]:
    """A file's extended attributes (capabilities, ACLs, user.*), not following a symlink."""
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }


@pytest.mark.parametrize("component", ["mysql", "php"])
def test_gold_restored_os_plus_component_is_identical(
    gold_tree: Path, gold_image: Path, tmp_path: Path, component: str
) -> None:
    m = load(gold_image)
    fs = tmp_path / "os.img"
    restore_fs(gold_image, m.os, fs)
    out = tmp_path / "comp"
    out.mkdir()
    run(
        [
            "tar",
            "--zstd",
            "-xpf",
            gold_image / m.component(component).data.file,
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
            out,
        ]
    )
    compared = 0
    with mounted(fs, tmp_path / "mnt") as mnt:
        for base in (mnt, out):
            for path, real in tree_files(base).items():
                if path in ("/var/lib/dpkg/status", "/lost+found") or path.startswith("/var/lib/bootenv/"):
                    continue
                gold = gold_tree / path.lstrip("/")
                assert (describe(real), xattrs(real)) == (describe(gold), xattrs(gold)), path
                compared += 1
        # The gold's setuid programs and its one ACL (journald's directory; no file of
        # this gold has capabilities) are in the OS image as they are in the gold.
        assert stat.S_IMODE(os.lstat(mnt / "usr/bin/su").st_mode) == 0o4755
        journal = xattrs(gold_tree / "var/log/journal")
        assert "system.posix_acl_default" in journal
        assert xattrs(mnt / "var/log/journal") == journal
    assert compared > 10000
    # The mysql data directory made by the postinst travels with mysql, with its owner.
    if component == "mysql":
        pam_tool = out / "usr/lib/mysql/plugin/auth_pam_tool_dir/auth_pam_tool"
        assert stat.S_IMODE(os.lstat(pam_tool).st_mode) == 0o4755  # setuid, from the component
        assert describe(out / "var/lib/mysql/ibdata1") == describe(gold_tree / "var/lib/mysql/ibdata1")
        assert "Package: mariadb-server\n" in (out / "var/lib/bootenv/dpkg/mysql.status").read_text()


@pytest.mark.parametrize("other_fs", [False, True])
def test_staging_is_exact_with_links_or_tar(tmp_path: Path, other_fs: bool) -> None:
    from bootenv.fsimage import tree_usage
    from bootenv.staging import stage

    gold = make_tree(tmp_path / "gold")
    os.chown(gold / "var/lib/dbdata", 999, 998)
    os.setxattr(gold / "etc/httpd", "user.dir", b"meta")
    paths = ["/", *sorted("/" + str(p.relative_to(gold)) for p in gold.rglob("*"))]
    where = tmp_path / "fs"
    where.mkdir()
    if other_fs:
        run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", where])
    try:
        staging = where / "staging"
        staging.mkdir()
        staged = stage(gold, paths, staging, tmp_path)
        assert staged.method == ("tar copy" if other_fs else "hard links")
        # The link farm counts usage from the gold's stats; a walk of the staged tree
        # agrees (make_tree's directories are small, so their blocks are equal too).
        assert (staged.used, staged.inodes) == tree_usage(staging)
        for path in paths[1:]:
            rel = path.lstrip("/")
            assert describe(staging / rel) == describe(gold / rel), path
            if (gold / rel).is_dir() and not (gold / rel).is_symlink():
                assert os.lstat(staging / rel).st_mtime_ns == os.lstat(gold / rel).st_mtime_ns, path
        assert os.getxattr(staging / "etc/httpd", "user.dir") == b"meta"
    finally:
        if other_fs:
            run(["umount", where])


def test_the_published_image_has_the_umasks_modes_and_no_bootenv_state(tmp_path: Path) -> None:
    """A web server running as its own user (nginx's www-data) must read the image; a
    gold that bootenv once provisioned carries that machine's records, which stay out."""
    gold = make_tree(tmp_path / "gold")
    state = gold / "var/lib/bootenv/dpkg"
    state.mkdir(parents=True)
    (state / "web.status").write_text("Package: httpd\nStatus: install ok installed\nVersion: 0.9-STALE\n")
    (gold / "etc/bootenv").mkdir()
    (gold / "etc/bootenv/layout.json.done").write_text("{}")
    out = tmp_path / "image"
    old = os.umask(0o022)
    try:
        capture(CaptureConfig(root=gold, output=out, components=SPECS, excludes=("/var/lib/dbdata",)))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
    m = load(out)
    db = ["/" + t.name.lstrip("./") for t in archive_members(out / m.component("db").data.file)]
    assert "/usr/sbin/dbd" in db and not [p for p in db if p.startswith("/var/lib/dbdata")]
    fs = tmp_path / "os.img"
    restore_fs(out, m.os, fs)
    with mounted(fs, tmp_path / "mnt") as mnt:
        assert not (mnt / "var/lib/bootenv/dpkg/web.status").exists()
        assert not (mnt / "etc/bootenv/layout.json.done").exists()


def test_a_gold_whose_var_is_a_symlink_is_captured_inside_itself(tmp_path: Path) -> None:
    """/var -> /data/var (absolute): the database read is the gold's, the OS image's status
    is rewritten where the link leads inside the image, and the gold's is not touched."""
    gold = make_tree(tmp_path / "gold")
    (gold / "data").mkdir()
    (gold / "var").rename(gold / "data/var")
    os.symlink("/data/var", gold / "var")
    status = gold / "data/var/lib/dpkg/status"
    before = status.read_bytes()
    out = tmp_path / "image"
    capture(CaptureConfig(root=gold, output=out, components=SPECS))
    assert status.read_bytes() == before
    m = load(out)
    web = {"/" + t.name.lstrip("./") for t in archive_members(out / m.component("web").data.file)}
    assert "/data/var/lib/dpkg/info/httpd.list" in web
    restore_fs(out, m.os, tmp_path / "os.img")
    with mounted(tmp_path / "os.img", tmp_path / "mnt") as mnt:
        assert os.readlink(mnt / "var") == "/data/var"
        text = (mnt / "data/var/lib/dpkg/status").read_text()
        assert "Package: curl\n" in text and "Package: httpd\n" not in text
        assert not (mnt / "data/var/lib/dpkg/info/httpd.list").exists()


def test_a_kernel_on_a_mounted_boot_is_refused_before_an_image_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/boot on its own filesystem (Debian's guided LVM layout): capture stays on ROOT's,
    so the OS image would have no kernel, and a target would be wiped for nothing."""
    gold = make_tree(tmp_path / "gold")
    (gold / "boot").mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4m", "bootfs", gold / "boot"])
    try:
        (gold / "boot/vmlinuz-6.1.0-9-amd64").write_text("kernel")
        (gold / "boot/initrd.img-6.1.0-9-amd64").write_text("initrd")
        capsys.readouterr()  # what an earlier test's log handler left: only the capture's is read
        code = main(["capture", str(gold), "-o", str(tmp_path / "image"), "--component", "web=httpd"])
    finally:
        run(["umount", gold / "boot"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert any(
        "/boot is a mount point: what is mounted there (/boot/initrd.img-6.1.0-9-amd64 and 1 more)" in e
        for e in err
    )
    assert err[-1].startswith(
        "bootenv: error: the OS image has no kernel in /boot (vmlinuz-*): /boot is a mount point, and "
        "capture stays on ROOT's filesystem (hint: put its files on ROOT's own filesystem and capture that: "
        f"mount --bind {gold} /mnt/gold; cp -a {gold}/boot/. /mnt/gold/boot/; bootenv capture /mnt/gold"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold"]


def test_a_mount_point_is_named_and_keeps_the_golds_own_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem mounted on /srv/data: its files are not captured, which the capture
    says; the image's /srv/data is the gold's own directory there (owner, mode, xattr,
    mtime), not the mounted tmpfs's root (1777). The ESP's mount is not named: a target
    gets its own."""
    gold = make_tree(tmp_path / "gold")
    (gold / "boot/efi").mkdir(parents=True)
    (gold / "boot/vmlinuz-6.1.0-9-amd64").write_text("kernel")
    data = gold / "srv/data"
    data.mkdir(parents=True)
    os.chown(data, 999, 998)
    os.chmod(data, 0o2750)
    os.setxattr(data, "user.kept", b"gold")
    os.utime(data, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    mounts = [data, gold / "boot/efi"]
    for where in mounts:
        run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", where])
    try:
        (data / "table.db").write_text("rows")
        (gold / "boot/efi/EFI").mkdir()
        with caplog.at_level(logging.WARNING):
            capture(CaptureConfig(root=gold, output=tmp_path / "image"))
    finally:
        for where in reversed(mounts):
            run(["umount", where])
    assert [r.getMessage() for r in caplog.records if "mount point" in r.getMessage()] == [
        "/srv/data is a mount point: what is mounted there (/srv/data/table.db) is on another filesystem "
        "and is not captured (capture stays on ROOT's filesystem)"
    ]
    m = load(tmp_path / "image")
    restore_fs(tmp_path / "image", m.os, tmp_path / "os.img")
    with mounted(tmp_path / "os.img", tmp_path / "mnt") as mnt:
        st = os.lstat(mnt / "srv/data")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 998, 0o2750)
        assert st.st_mtime_ns == 1_500_000_000_000_000_000
        assert os.getxattr(mnt / "srv/data", "user.kept") == b"gold"
        assert list((mnt / "srv/data").iterdir()) == []
        assert (mnt / "boot/vmlinuz-6.1.0-9-amd64").read_text() == "kernel"


def test_a_path_longer_than_path_max_with_root_in_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A component carries it (tar reads it relative to ROOT); the OS image's staging
    needs ROOT/path whole, so it fails in one line that names it shortened and says what
    to do."""
    gold = make_tree(tmp_path / "gold")
    deep = long_path(gold, "/var/lib/dbdata") + "/leaf"  # db's data (rule 4)
    assert len(os.fsencode(f"{gold}{deep}")) > 4096
    out = tmp_path / "image"
    assert main(["capture", str(gold), "-o", str(out), "--component", "db=dbserver"]) == 0
    m = load(out)
    members = {"/" + t.name.removeprefix("./"): t for t in archive_members(out / m.component("db").data.file)}
    assert members[deep].size == 4
    capsys.readouterr()

    assert main(["capture", str(gold), "-o", str(tmp_path / "os-image")]) == 1  # in the OS now
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and len(err[-1]) < 600
    assert err[-1].startswith("bootenv: error: /var/lib/dbdata/00ddd")
    # The first path staging could not take: the deepest directory, or the leaf.
    found = re.search(
        r"\((\d+) bytes\) \(in (.*)\): File name too long: (\d+) bytes with ROOT in front", err[-1]
    )
    assert found is not None and found[2] == str(gold)
    assert int(found[3]) == int(found[1]) + len(str(gold)) > 4096
    assert err[-1].endswith(
        f"more than PATH_MAX (4096) (hint: capture ROOT through a shorter path: mount --bind {gold} /g; "
        "bootenv capture /g ...)"
    )
    assert not (tmp_path / "os-image").exists() and not list(tmp_path.glob(".os-image*"))
