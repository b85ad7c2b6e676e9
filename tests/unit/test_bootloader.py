"""Which boot loaders go on a disk: both on 512-byte sectors; on a 4Kn disk, UEFI only,
and a machine that started the ramdisk by legacy BIOS is refused the disk unwritten."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bootenv import agent, agent_disk, agent_plan, bootloader, target
from bootenv.bootloader import BootPlan, Firmware, plan_boot, running_firmware
from bootenv.cmdline import parse_cmdline
from bootenv.errors import FatalError, UserError
from bootenv.partition import MiB, plan_partitions, required_size
from tests.unit.test_agent import ROOT_MIN, all_valid, digest, fake_disk, need, setup

IDENT = target.Identity("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", "1A2B-3C4D", "web1")
BIOS_WHY = "which grub cannot boot from under legacy BIOS"


def test_both_loaders_on_512_byte_sectors() -> None:
    for firmware in Firmware:
        boot = plan_boot("/dev/sda", 512, firmware)
        assert boot == BootPlan(bios=True, efi=True)
        assert boot.loaders == ("bios", "uefi") and boot.describe() == "BIOS and UEFI"


def test_a_4kn_disk_under_uefi_gets_the_uefi_loader_only() -> None:
    boot = plan_boot("/dev/nvme0n1", 4096, Firmware.UEFI)
    assert (boot.bios, boot.efi, boot.loaders) == (False, True, ("uefi",))
    assert boot.describe() == "UEFI only"
    assert boot.note is not None
    assert boot.note.startswith("/dev/nvme0n1 has 4096-byte logical sectors")
    assert "legacy BIOS" in boot.note and "UEFI loader only" in boot.note


def test_a_4kn_disk_under_legacy_bios_is_refused() -> None:
    with pytest.raises(UserError) as caught:
        plan_boot("/dev/sdb", 4096, Firmware.BIOS)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("/dev/sdb has 4096-byte logical sectors")
    assert "started the ramdisk by legacy BIOS" in line and "UEFI" in line  # and what to do


def test_running_firmware_is_read_from_sysfs(tmp_path: Path) -> None:
    efi = tmp_path / "firmware/efi"
    assert running_firmware(efi) is Firmware.BIOS
    efi.mkdir(parents=True)
    assert running_firmware(efi) is Firmware.BIOS  # empty: as grub-install tells them apart
    (efi / "systab").write_text("ACPI20=0x7f77e014\n")
    assert running_firmware(efi) is Firmware.UEFI


def test_install_bios_refuses_a_disk_without_512_byte_sectors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sector numbers it writes count 512-byte sectors: on a 4Kn disk boot.img would
    read 8 times too far, so it writes nothing there (nor runs grub-mkimage)."""
    disk = fake_disk(tmp_path, required_size(ROOT_MIN, 4096))
    before = digest(disk)
    monkeypatch.setattr(bootloader, "sector_size", lambda fd: 4096)
    plan = plan_partitions(disk.stat().st_size, 4096, ROOT_MIN)
    with pytest.raises(FatalError, match=r"has 4096-byte logical sectors: grub's BIOS boot code cannot load"):
        bootloader.install_bios(str(disk), tmp_path, IDENT.root_uuid, plan.bios.offset, plan.bios.size)
    assert digest(disk) == before


def test_agent_refuses_a_4kn_disk_under_legacy_bios_before_any_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN), 4096) + 64 * MiB)
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent_disk, "sector_size", lambda fd: 4096)
    monkeypatch.setattr(bootloader, "running_firmware", lambda: Firmware.BIOS)
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    with pytest.raises(UserError, match=r"4096-byte logical sectors.*legacy BIOS"):
        agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.callback={url}"))
    assert digest(disk) == before
    assert written == [] and wiped == []
    assert got[-1]["event"] == "error" and got[-1]["fatal"] is True
    assert f"{disk} has 4096-byte logical sectors" in str(got[-1]["message"])
    assert [e["step"] for e in got if e.get("status") == "failed"] == ["preflight"]
    assert all_valid(got)


def test_agent_reports_a_4kn_disk_under_uefi_as_uefi_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN), 4096) + 64 * MiB)
    setup(monkeypatch, disk)
    monkeypatch.setattr(agent_disk, "sector_size", lambda fd: 4096)
    monkeypatch.setattr(bootloader, "running_firmware", lambda: Firmware.UEFI)
    layouts: list[agent_plan.Layout] = []
    monkeypatch.setattr(agent, "_write_disk", lambda cfg, d, layout, *a: layouts.append(layout))
    result = agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.callback={url}"))
    assert layouts[0].plan.sector_size == 4096 and layouts[0].boot == result.boot
    assert result.boot.loaders == ("uefi",)
    last = got[-1]
    assert (last["step"], last["status"]) == ("handoff", "start")
    data = last["data"]
    assert isinstance(data, dict)
    assert data["bootloaders"] == ["uefi"]
    assert data["warnings"] == [
        f"{disk} has 4096-byte logical sectors, {BIOS_WHY}: installing the UEFI loader only"
    ]
    assert all_valid(got)


def test_agent_reports_both_loaders_on_512_byte_sectors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)) + 64 * MiB)
    setup(monkeypatch, disk)
    monkeypatch.setattr(bootloader, "running_firmware", lambda: Firmware.BIOS)
    monkeypatch.setattr(agent, "_write_disk", lambda *a: None)
    result = agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.callback={url}"))
    assert result.boot == BootPlan(bios=True, efi=True)
    data = got[-1]["data"]
    assert isinstance(data, dict)
    assert data["bootloaders"] == ["bios", "uefi"] and "warnings" not in data


def _fake_target(root: Path) -> Path:
    (root / "boot/grub").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-18-amd64").write_bytes(b"kernel")
    return root


def test_install_bootloader_on_a_4kn_disk_writes_no_bios_loader_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installed: list[str] = []
    monkeypatch.setattr(bootloader, "copy_modules", lambda root: None)
    monkeypatch.setattr(bootloader, "install_bios", lambda disk, *a: installed.append(f"bios {disk}"))
    monkeypatch.setattr(bootloader, "install_efi", lambda esp, uuid: installed.append(f"efi {esp}"))
    plan = plan_partitions(1024 * MiB, 4096, ROOT_MIN)
    boot = plan_boot("/dev/nvme0n1", 4096, Firmware.UEFI)
    root = _fake_target(tmp_path / "root")
    with caplog.at_level(logging.WARNING, logger="bootenv.agent"):
        agent._install_bootloader(
            "/dev/nvme0n1", agent_plan.Layout(plan, boot), root, "/dev/nvme0n1p2", IDENT, ""
        )
    assert installed == ["efi /dev/nvme0n1p2"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [boot.note]
    assert (root / "boot/grub/grub.cfg").is_file()  # the menu UEFI's grub loads


def test_install_bootloader_on_512_byte_sectors_writes_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed: list[str] = []
    monkeypatch.setattr(bootloader, "copy_modules", lambda root: None)
    monkeypatch.setattr(
        bootloader, "install_bios", lambda disk, root, uuid, offset, size: installed.append(f"bios {offset}")
    )
    monkeypatch.setattr(bootloader, "install_efi", lambda esp, uuid: installed.append(f"efi {esp}"))
    plan = plan_partitions(1024 * MiB, 512, ROOT_MIN)
    layout = agent_plan.Layout(plan, plan_boot("/dev/sda", 512, Firmware.BIOS))
    agent._install_bootloader("/dev/sda", layout, _fake_target(tmp_path / "root"), "/dev/sda2", IDENT, "")
    assert installed == [f"bios {MiB}", "efi /dev/sda2"]
