"""A full disk (ENOSPC, simulated) while bootenv writes a file leaves nothing behind:
no temp file, no empty or half key, no kernel without its initramfs; the error is one
line naming the file."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootenv import merge, ramdisk, ramdisk_export, signing
from bootenv.cli import main
from bootenv.merge import MergeState


def _full_after(calls: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, failing with ENOSPC from its call number `calls` (0: the first) on."""
    seen = [0]

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        if seen[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("calls", [0, 1])
def test_keygen_on_a_full_disk_leaves_neither_key(
    calls: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(signing, "write_all", _full_after(calls, signing.write_all))
    assert main(["keygen", "-o", str(tmp_path / "keys/key")]) == 2
    err = capsys.readouterr().err
    name = "key.pub" if calls == 0 else "key"
    assert err.count("\n") == 1 and f"cannot write {tmp_path}/keys/{name}: No space left on device" in err
    assert os.listdir(tmp_path / "keys") == []
    monkeypatch.undo()
    assert main(["keygen", "-o", str(tmp_path / "keys/key")]) == 0  # and a re-run makes both
    assert sorted(os.listdir(tmp_path / "keys")) == ["key", "key.pub"]
    assert (tmp_path / "keys/key").stat().st_mode & 0o777 == 0o600


def test_keygen_never_replaces_a_key_made_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = signing._write_new

    def racing(tmp: Path, data: bytes, mode: int, final: Path) -> None:
        real(tmp, data, mode, final)
        if final.name == "key":
            final.write_bytes(b"another keygen's\n")

    monkeypatch.setattr(signing, "_write_new", racing)
    with pytest.raises(signing.UserError, match="already exists"):
        signing.keygen(tmp_path / "key")
    assert os.listdir(tmp_path) == ["key"] and (tmp_path / "key").read_bytes() == b"another keygen's\n"


def test_sign_on_a_full_disk_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_signing import make_image

    image = make_image(tmp_path / "img")
    signing.keygen(tmp_path / "k")
    before = sorted(os.listdir(image))
    monkeypatch.setattr(signing, "write_all", _full_after(0, signing.write_all))
    assert main(["sign", str(image), "--key", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {image}/manifest.json.sig: No space left" in err
    assert sorted(os.listdir(image)) == before


@pytest.mark.parametrize("calls", [0, 1, 2])
def test_a_ramdisk_export_on_a_full_disk_keeps_the_old_pair(
    calls: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "cache"
    built.mkdir()
    (built / "vmlinuz").write_bytes(b"new kernel")
    (built / "initramfs.img").write_bytes(b"new initramfs")
    out = tmp_path / "boot"
    out.mkdir()
    old = {"vmlinuz": b"old kernel", "initramfs.img": b"old initramfs", "ramdisk.json": b"{}"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    rd = ramdisk.Ramdisk(built / "vmlinuz", built / "initramfs.img", "6.1", "k" * 16, True)
    real_write = ramdisk_export._write_temp
    monkeypatch.setattr(ramdisk_export, "_write_temp", _full_after(calls, real_write))
    with pytest.raises(ramdisk_export.UserError, match=f"cannot write {out}/.*: No space left on device"):
        ramdisk_export.export(rd, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    monkeypatch.undo()
    build = ramdisk_export.export(rd, out).build
    assert (out / "vmlinuz").read_bytes() == b"new kernel"
    assert (out / "initramfs.img").read_bytes() == b"new initramfs"
    assert sorted(p.name for p in out.iterdir()) == [build, "initramfs.img", "ramdisk.json", "vmlinuz"]


def test_a_ramdisk_file_cut_short_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(b"k" * 100)
    monkeypatch.setattr(
        ramdisk_export.shutil, "copyfileobj", _full_after(0, ramdisk_export.shutil.copyfileobj)
    )
    with pytest.raises(OSError, match="No space left"):
        ramdisk_export._write_temp(tmp_path / ".vmlinuz.tmp", src, None)
    assert os.listdir(tmp_path) == ["vmlinuz"]


def test_an_owner_marker_on_a_full_disk_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = MergeState(tmp_path)
    real_link = os.link
    monkeypatch.setattr(merge.os, "link", _full_after(0, real_link))
    with pytest.raises(OSError, match="No space left"):
        state.mark("etc/foo.conf", "a", b"a\n", placed=True)
    assert os.listdir(state.owners) == []


def test_an_owner_marker_whose_write_fails_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = MergeState(tmp_path)
    real_open = open

    def full_open(path: Any, mode: str = "r", *args: Any) -> Any:
        f = real_open(path, mode, *args)
        if "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(merge, "open", full_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        state.mark("etc/foo.conf", "a", b"a\n", placed=True)
    assert os.listdir(state.owners) == []


def test_a_merge_record_on_a_full_disk_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge.os, "fsync", _full_after(0, os.fsync))
    with pytest.raises(OSError, match="No space left"):
        merge._atomic_write(tmp_path / "base", b"data")
    assert os.listdir(tmp_path) == []


def test_a_killed_runs_owner_marker_temp_files_go_before_the_next_layout(tmp_path: Path) -> None:
    """A kill -9 between writing a marker's temp file and removing it: the name holds the
    dead process's pid, so only the next layout's sweep removes it; real markers stay."""
    from bootenv.layout import LayoutConfig, layout
    from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image

    image = make_image(tmp_path / "img", [Comp("good", [d("srv"), f("srv/ok", "fine")])])
    root = tmp_path / "root"
    state = MergeState(root)
    state.mark("etc/x.conf", "other", b"text", placed=True)
    kept = os.listdir(state.owners)
    (state.owners / ".abc.good.def.4242.tmp").write_bytes(b"")
    res = layout(LayoutConfig(str(image), "all", root, streams=1), activator=ActivatedUnits())
    assert res.ok
    assert os.listdir(state.owners) == kept
