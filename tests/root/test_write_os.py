"""`bootenv write-os` of the real LAMP gold image onto sparse files and loop devices."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from bootenv.cli import main
from bootenv.errors import UserError, VerificationError
from bootenv.run import popen, run
from tests.conftest import require_root, require_tools
from tests.imagetools import describe, load, tree_files

MiB = 1 << 20
# Rewritten by capture on purpose: the OS image's dpkg database lists only OS packages.
REWRITTEN = {"/var/lib/dpkg/status"}
SAMPLE = (
    "/usr/bin/bash",
    "/usr/bin/dpkg",
    "/etc/passwd",
    "/etc/group",
    "/etc/os-release",  # a symlink
    "/bin",  # a symlink to usr/bin (merged /usr)
    "/usr/lib/os-release",
    "/etc/hostname",
    "/usr/lib/systemd/systemd",
    "/usr/sbin/sshd",
)


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tools("losetup", "e2fsck", "mount")


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = run(["losetup", "--find", "--show", backing]).stdout.decode().strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev])


@contextmanager
def mounted_ro(dev: str | Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    opts = "ro,noload" if str(dev).startswith("/dev/") else "loop,ro,noload"
    run(["mount", "-t", "ext4", "-o", opts, dev, where])
    try:
        yield where
    finally:
        run(["umount", where])


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def garbage(path: Path, size: int) -> Path:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.truncate(size)
    return path


def write_os(image: Path | str, device: str | Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:  # type: ignore[type-arg]
    rc = main(["write-os", "--insecure", "--image", str(image), "--device", str(device), "--json", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result: dict = json.loads(out.out)  # type: ignore[type-arg]
    return result


def assert_matches_gold(mnt: Path, gold: Path, *, full: bool) -> int:
    """Every file in the written filesystem (or in a few directories) equals the gold's."""
    for rel in SAMPLE:
        assert describe(mnt / rel.lstrip("/")) == describe(gold / rel.lstrip("/")), rel
    assert not (mnt / "usr/sbin/apache2").exists()  # in the apache component, not the OS
    assert not (mnt / "etc/machine-id").exists()  # machine identity is never captured
    roots = [mnt] if full else [mnt / "etc", mnt / "usr/lib/systemd/system", mnt / "usr/bin"]
    compared = 0
    for root in roots:
        for real in tree_files(root).values():
            rel = "/" + str(real.relative_to(mnt))
            if rel in REWRITTEN or rel.startswith("/lost+found"):
                continue
            assert describe(real) == describe(gold / rel.lstrip("/")), rel
            compared += 1
    return compared


def test_write_os_to_sparse_file(
    gold_image: Path, gold_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = load(gold_image)
    disk = tmp_path / "disk.img"
    result = write_os(gold_image, disk, capsys)
    assert result["image_size"] == manifest.rootfs.image_size == disk.stat().st_size
    assert result["bytes_written"] == manifest.os.data.raw_size
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # the holes stayed holes
    run(["e2fsck", "-fn", disk])
    with mounted_ro(disk, tmp_path / "mnt") as mnt:
        compared = assert_matches_gold(mnt, gold_tree, full=True)
    assert compared > 10000


def test_write_os_to_loop_device_over_http(
    gold_image: Path, gold_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.httpfault import Fault, FaultServer

    manifest = load(gold_image)
    # A reused disk: garbage everywhere, so the holes the writer skips are not zeros.
    backing = garbage(tmp_path / "backing.img", manifest.rootfs.image_size + 64 * MiB)
    with ExitStack() as stack:
        srv = stack.enter_context(FaultServer(gold_image))
        size = manifest.os.data.size
        srv.faults[manifest.os.data.file] = Fault(drops=[size // 3, 2 * size // 3])
        dev = stack.enter_context(loop_device(backing))
        result = write_os(srv.url, dev, capsys)
        assert result["direct"] is True
        assert [r.start for r in srv.requests_for(manifest.os.data.file)] == [0, size // 3, 2 * size // 3]
        run(["e2fsck", "-fn", dev])
        mnt = stack.enter_context(mounted_ro(dev, tmp_path / "mnt"))
        assert assert_matches_gold(mnt, gold_tree, full=False) > 500
    with open(backing, "rb") as f:  # stale signatures at the end of the disk are gone
        f.seek(-MiB, os.SEEK_END)
        assert f.read() == bytes(MiB)


def test_too_small_device_is_refused_untouched(
    gold_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = load(gold_image)
    head = os.urandom(2 * MiB)
    backing = sparse(tmp_path / "small.img", manifest.rootfs.image_size - MiB, head)
    with loop_device(backing) as dev:
        rc = main(["write-os", "--insecure", "--image", str(gold_image), "--device", dev])
        err = capsys.readouterr().err
    assert rc == UserError.exit_code
    assert "too small" in err and "Traceback" not in err
    with open(backing, "rb") as f:
        assert f.read(2 * MiB) == head
    assert backing.stat().st_blocks * 512 <= 2 * MiB + 64 * 1024  # nothing else was written


@pytest.mark.parametrize("how", ["mounted", "under a mounted loop"])
def test_a_device_in_use_is_refused_untouched(
    gold_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """Mounted itself, or under a loop device that is mounted: a loop device over a disk is
    neither in its holders nor an O_EXCL claim on it."""
    backing = sparse(tmp_path / "disk.img", 64 * MiB)
    run(["mke2fs", "-q", "-t", "ext4", backing])
    before = backing.read_bytes()
    with ExitStack() as stack:
        dev = stack.enter_context(loop_device(backing))
        over = stack.enter_context(loop_device(Path(dev))) if how != "mounted" else dev
        stack.enter_context(mounted_ro(over, tmp_path / "mnt"))
        rc = main(["write-os", "--insecure", "--image", str(gold_image), "--device", dev])
        err = capsys.readouterr().err
    want = "mounted at" if how == "mounted" else f"{Path(over).name} is attached over it"
    assert rc == UserError.exit_code and want in err, err
    assert backing.read_bytes() == before


def test_a_file_behind_a_mounted_loop_is_refused_untouched(
    gold_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backing = sparse(tmp_path / "disk.img", 64 * MiB)
    run(["mke2fs", "-q", "-t", "ext4", backing])
    before = backing.read_bytes()
    with loop_device(backing) as dev, mounted_ro(dev, tmp_path / "mnt"):
        rc = main(["write-os", "--insecure", "--image", str(gold_image), "--device", str(backing)])
        err = capsys.readouterr().err
    assert rc == UserError.exit_code and f"backs {Path(dev).name}, which is mounted" in err, err
    assert backing.read_bytes() == before


def test_failed_write_leaves_no_mountable_filesystem(
    gold_image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that held a good OS and then got a corrupt stream must not mount at all."""
    manifest = load(gold_image)
    bad = tmp_path / "bad-image"
    bad.mkdir()
    for blob in gold_image.iterdir():
        os.symlink(blob, bad / blob.name)
    data = bad / manifest.os.data.file
    data.unlink()
    shutil.copyfile(gold_image / manifest.os.data.file, data)
    with open(data, "r+b") as f:  # a byte near the end: most of the disk is written by then
        f.seek(manifest.os.data.size - 4096)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    backing = sparse(tmp_path / "disk.img", manifest.rootfs.image_size)
    with loop_device(backing) as dev:
        write_os(gold_image, dev, capsys)
        run(["e2fsck", "-fn", dev])  # a good, mountable OS ...
        rc = main(["write-os", "--insecure", "--image", str(bad), "--device", dev])
        err = capsys.readouterr().err
        assert rc == VerificationError.exit_code, err
        assert run(["e2fsck", "-fn", dev], check=False).returncode != 0  # ... gone
        probe = run(["blkid", "-p", dev], check=False)
        assert probe.returncode != 0 and b"ext4" not in probe.stdout
    with open(backing, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_power_cut_mid_write_leaves_no_mountable_filesystem(gold_image: Path, tmp_path: Path) -> None:
    """kill -9 in the middle of a write: no cleanup code runs, yet nothing mounts."""
    from tests.unit.httpfault import Fault, FaultServer

    manifest = load(gold_image)
    backing = sparse(tmp_path / "disk.img", manifest.rootfs.image_size)
    with ExitStack() as stack:
        dev = stack.enter_context(loop_device(backing))
        run(
            [
                sys.executable,
                "-m",
                "bootenv",
                "write-os",
                "--insecure",
                "--image",
                gold_image,
                "--device",
                dev,
            ]
        )
        run(["e2fsck", "-fn", dev])  # a good OS to begin with
        srv = stack.enter_context(FaultServer(gold_image))
        srv.faults[manifest.os.data.file] = Fault(stall_at=manifest.os.data.size // 2, stall_seconds=20)
        proc = popen(
            [sys.executable, "-m", "bootenv", "write-os", "--insecure", "--image", srv.url, "--device", dev]
        )
        stack.callback(proc.kill)
        assert srv.stalled.wait(60), "the writer never got halfway"
        proc.kill()  # SIGKILL
        assert run(["e2fsck", "-fn", dev], check=False).returncode != 0
        probe = run(["blkid", "-p", dev], check=False)
        assert b"ext4" not in probe.stdout
    with open(backing, "rb") as f:
        assert f.read(MiB) == bytes(MiB)
