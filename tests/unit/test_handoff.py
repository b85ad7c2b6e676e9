"""KexecSpec from a fake /boot tree, and the kernel arguments the target gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv.errors import FatalError
from bootenv.handoff import find_kernel, kernel_args, kexec_load_argv, kexec_spec

UUID = "0b0e9a55-1f2c-4d6e-8a9b-c0d1e2f3a4b5"


def boot_tree(root: Path, versions: list[str], *, initrd: bool = True) -> Path:
    boot = root / "boot"
    boot.mkdir(parents=True)
    for v in versions:
        (boot / f"vmlinuz-{v}").write_bytes(b"MZ kernel")
        (boot / f"config-{v}").write_text("")
        if initrd:
            (boot / f"initrd.img-{v}").write_bytes(b"initrd")
    return root


def test_newest_kernel_wins_by_version_not_by_string(tmp_path: Path) -> None:
    root = boot_tree(tmp_path, ["6.1.0-9-amd64", "6.1.0-50-amd64", "5.10.0-28-amd64"])
    files = find_kernel(root)
    assert files.version == "6.1.0-50-amd64"
    assert files.kernel == "/boot/vmlinuz-6.1.0-50-amd64"
    assert files.initrd == "/boot/initrd.img-6.1.0-50-amd64"


def test_spec(tmp_path: Path) -> None:
    root = boot_tree(tmp_path, ["6.1.0-50-amd64"])
    cmdline = "BOOT_IMAGE=x console=tty0 console=ttyS0,115200n8 bootenv.image=http://h/i quiet"
    spec = kexec_spec(root, UUID, cmdline)
    assert spec.kernel == root / "boot/vmlinuz-6.1.0-50-amd64"
    assert spec.initrd == root / "boot/initrd.img-6.1.0-50-amd64"
    assert spec.cmdline == f"root=UUID={UUID} ro console=tty0 console=ttyS0,115200n8"
    assert kexec_load_argv(spec) == [
        "kexec",
        "-l",
        str(spec.kernel),
        f"--command-line={spec.cmdline}",
        f"--initrd={spec.initrd}",
    ]


def test_no_initrd(tmp_path: Path) -> None:
    root = boot_tree(tmp_path, ["6.6.0"], initrd=False)
    spec = kexec_spec(root, UUID)
    assert spec.initrd is None
    assert not any(a.startswith("--initrd") for a in kexec_load_argv(spec))


def test_default_consoles_when_the_ramdisk_had_none() -> None:
    assert kernel_args(UUID, "quiet bootenv.image=http://h/") == (
        f"root=UUID={UUID}",
        "ro",
        "console=tty0",
        "console=ttyS0,115200n8",
    )


def test_no_kernel_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(FatalError, match="no kernel"):
        find_kernel(tmp_path)
