"""Disk choice on fake udev data: every rejection has its reason, the winner is stable."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from bootenv.cmdline import DiskKind, DiskSelector, parse_disk
from bootenv.disks import DiskInfo, bus_of, choose_disk, rejection
from bootenv.errors import UserError

GiB = 1 << 30
NEED = 10 * GiB


def disk(name: str, size: int = 100 * GiB, **kw: object) -> DiskInfo:
    return DiskInfo(devnode=f"/dev/{name}", size=size, **kw)  # type: ignore[arg-type]


FLEET = [
    disk("sda", 500 * GiB, rotational=True, id_path="pci-0000:00:1f.2-ata-1", serial="HDD_A"),
    disk("sdb", 16 * GiB, removable=True, id_path="pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0"),
    disk("sdc", 200 * GiB, read_only=True, id_path="pci-0000:00:1f.2-ata-3"),
    disk("sdd", 4 * GiB, id_path="pci-0000:00:1f.2-ata-4"),
    disk("sde", 64 * GiB, boot=True, mounts=("/run/initramfs/live",), id_path="pci-0000:00:1f.2-ata-5"),
    disk("nvme0n1", 960 * GiB, id_path="pci-0000:03:00.0-nvme-1", serial_short="S4EWNX0N"),
    disk("nvme1n1", 480 * GiB, id_path="pci-0000:04:00.0-nvme-1", serial_short="S4EWNX0M"),
    disk("loop0", 50 * GiB),
    disk("sr0", 1 * GiB, removable=True),
    disk("sdf", 300 * GiB, mounts=("/mnt/data",), id_path="pci-0000:00:1f.2-ata-6"),
    disk("sdg", 300 * GiB, holders=("md0",), id_path="pci-0000:00:1f.2-ata-7"),
]


def reasons(choice_rejected: tuple[object, ...]) -> dict[str, str]:
    return {r.disk.name: r.reason for r in choice_rejected}  # type: ignore[attr-defined]


def test_auto_prefers_smallest_non_rotational_that_fits() -> None:
    choice = choose_disk(FLEET, DiskSelector(), NEED)
    assert choice.disk.name == "nvme1n1"
    why = reasons(choice.rejected)
    assert why["sda"] == "/dev/nvme1n1 is preferred"
    assert why["nvme0n1"] == "/dev/nvme1n1 is preferred"
    assert why["sdb"] == "removable"
    assert why["sdc"] == "read-only"
    assert why["sdd"] == "too small (4096 MiB, the image needs 10240 MiB)"
    assert why["sde"] == "holds the running root or the boot media"
    assert why["loop0"] == "virtual device"
    assert why["sr0"] == "virtual device"
    assert why["sdf"] == "mounted at /mnt/data"
    assert why["sdg"] == "in use by md0"
    assert len(choice.rejected) == len(FLEET) - 1


def test_choice_is_deterministic_whatever_the_order() -> None:
    rng = random.Random(7)
    for _ in range(20):
        fleet = FLEET[:]
        rng.shuffle(fleet)
        assert choose_disk(fleet, DiskSelector(), NEED).disk.name == "nvme1n1"


def test_rotational_disk_when_it_is_the_only_one() -> None:
    assert choose_disk([FLEET[0], FLEET[1]], DiskSelector(), NEED).disk.name == "sda"


def test_equal_disks_are_ordered_by_stable_path() -> None:
    a = disk("sdb", 100 * GiB, id_path="pci-0000:00:1f.2-ata-2")
    b = disk("sda", 100 * GiB, id_path="pci-0000:00:1f.2-ata-9")
    assert choose_disk([b, a], DiskSelector(), NEED).disk.name == "sdb"
    c = disk("vdb")
    d = disk("vda")
    assert choose_disk([c, d], DiskSelector(), NEED).disk.name == "vda"


@pytest.mark.parametrize(
    ("sel", "want"),
    [
        ("/dev/sda", "sda"),
        ("serial:S4EWNX0N", "nvme0n1"),
        ("serial:HDD_A", "sda"),
        ("path:pci-0000:00:1f.2-ata-1", "sda"),
        ("path:/dev/disk/by-path/pci-0000:04:00.0-nvme-1", "nvme1n1"),
    ],
)
def test_explicit_selection(sel: str, want: str) -> None:
    choice = choose_disk(FLEET, parse_disk(sel), NEED)
    assert choice.disk.name == want
    assert all(r.reason.startswith("not ") for r in choice.rejected)


def test_explicit_choice_still_obeys_the_safety_rules() -> None:
    for name, why in (("sdb", "removable"), ("sde", "boot media"), ("sdd", "too small"), ("sdf", "mounted")):
        with pytest.raises(UserError, match=why) as info:
            choose_disk(FLEET, DiskSelector(DiskKind.DEVICE, f"/dev/{name}"), NEED)
        assert "not /dev/" not in str(info.value)  # only the relevant reason is shown


def test_explicit_virtual_device_is_allowed() -> None:
    assert choose_disk(FLEET, DiskSelector(DiskKind.DEVICE, "/dev/loop0"), NEED).disk.name == "loop0"


def test_no_match_and_no_candidates() -> None:
    with pytest.raises(UserError, match="no such disk"):
        choose_disk(FLEET, DiskSelector(DiskKind.SERIAL, "NOPE"), NEED)
    with pytest.raises(UserError, match=r"/dev/sdb: removable; /dev/sdd: too small"):
        choose_disk([FLEET[1], FLEET[3]], DiskSelector(), NEED)
    with pytest.raises(UserError, match="no such disk"):
        choose_disk([], DiskSelector(), NEED)


def test_ambiguous_serial_is_refused() -> None:
    twins = [disk("sda", serial="X"), disk("sdb", serial="X")]
    with pytest.raises(UserError, match="matches several disks"):
        choose_disk(twins, DiskSelector(DiskKind.SERIAL, "X"), NEED)


def test_empty_card_reader() -> None:
    assert rejection(disk("sdh", 0), NEED) == "no medium (size 0)"


UDEV = Path(__file__).parent / "udev"


def udev_props(dump: str) -> tuple[dict[str, str], str]:
    """The properties (E:) and the sysfs path (P:) in one `udevadm info --query=all` dump."""
    lines = (UDEV / dump).read_text().splitlines()
    devpath = next(line[3:] for line in lines if line.startswith("P: "))
    return dict(line[3:].split("=", 1) for line in lines if line.startswith("E: ")), devpath


def udev_disk(dump: str, size: int, **kw: object) -> DiskInfo:
    """A DiskInfo as `read_disks` makes it from a dump."""
    props, devpath = udev_props(dump)
    return DiskInfo(
        devnode=props["DEVNAME"],
        size=size,
        serial=props.get("ID_SERIAL", ""),
        serial_short=props.get("ID_SERIAL_SHORT", ""),
        id_path=props.get("ID_PATH", ""),
        model=props.get("ID_MODEL", ""),
        bus=bus_of(props, devpath),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("dump", "bus"),
    [("usb-stick.txt", "usb"), ("usb-sata-enclosure.txt", "usb"), ("sata-hdd.txt", "ata"), ("nvme.txt", "")],
)
def test_the_bus_comes_from_udev(dump: str, bus: str) -> None:
    props, devpath = udev_props(dump)
    assert bus_of(props, devpath) == bus


def test_a_usb_disk_is_known_by_any_one_of_its_signs() -> None:
    """ID_BUS says ata for a SATA disk in a USB enclosure (udev's ata_id answers for it):
    its ID_PATH says USB, and so does its sysfs path, each on its own."""
    props, devpath = udev_props("usb-sata-enclosure.txt")
    assert props["ID_BUS"] == "ata"
    assert bus_of(props, "") == "usb"  # ID_PATH
    no_path = {k: v for k, v in props.items() if k != "ID_PATH"}
    assert bus_of(no_path, devpath) == "usb"  # the usb2 bus in the sysfs path
    assert bus_of(no_path, "") == "ata"
    stick, stick_path = udev_props("usb-stick.txt")
    assert bus_of({"ID_BUS": stick["ID_BUS"]}, "") == "usb"
    assert bus_of({}, stick_path) == "usb"
    for dump in ("sata-hdd.txt", "nvme.txt"):
        assert bus_of({}, udev_props(dump)[1]) == ""


TB, GB = 10**12, 10**9


def test_auto_never_takes_a_usb_disk() -> None:
    """Two 4 TB HDDs and the 16 GB stick iPXE came from, which says it is not removable
    and is not mounted: the stick was the smallest disk that fits. An NVMe and a USB SSD
    (an ata_id disk: ID_BUS=ata): the USB SSD was the smaller SSD."""
    stick = udev_disk("usb-stick.txt", 16 * GB, rotational=True)
    hdds = [
        udev_disk("sata-hdd.txt", 4 * TB, rotational=True),
        disk("sdb", 4 * TB, rotational=True, bus="ata", id_path="pci-0000:00:17.0-ata-2.0"),
    ]
    choice = choose_disk([*hdds, stick], DiskSelector(), NEED)
    assert choice.disk.name == "sda"
    assert reasons(choice.rejected)["sdc"] == "on USB (name it in bootenv.disk= to install on it)"
    usb_ssd = udev_disk("usb-sata-enclosure.txt", 250 * GB)
    nvme = udev_disk("nvme.txt", 960 * GB)
    assert choose_disk([usb_ssd, nvme], DiskSelector(), NEED).disk.name == "nvme0n1"


def test_a_usb_disk_is_taken_when_named() -> None:
    stick = udev_disk("usb-stick.txt", 16 * GB)
    usb_ssd = udev_disk("usb-sata-enclosure.txt", 250 * GB)
    both = [stick, usb_ssd]
    with pytest.raises(UserError, match=r"/dev/sdc: on USB \(name it in bootenv.disk=.*; /dev/sdd: on USB"):
        choose_disk(both, DiskSelector(), NEED)
    for sel, want in (
        ("/dev/sdc", "sdc"),
        ("serial:S6PENL0T412345A", "sdd"),
        ("path:pci-0000:00:14.0-usb-0:2:1.0-scsi-0:0:0:0", "sdd"),
    ):
        assert choose_disk(both, parse_disk(sel), NEED).disk.name == want
    # Named, it still obeys the other rules.
    with pytest.raises(UserError, match="/dev/sdc: removable"):
        choose_disk([replace(stick, removable=True)], parse_disk("/dev/sdc"), NEED)


def test_a_smaller_emmc_wins_over_an_nvme() -> None:
    """The documented rule holds across kinds: the smallest non-rotational disk that fits
    wins (the eMMC), keeping the NVMe for data; its boot areas are read-only and tiny."""
    emmc = [
        disk("mmcblk0", 32 * GB, id_path="platform-80860F14:00"),
        disk("mmcblk0boot0", 4 << 20, read_only=True, id_path="platform-80860F14:00"),
        disk("mmcblk0boot1", 4 << 20, read_only=True, id_path="platform-80860F14:00"),
    ]
    choice = choose_disk([*emmc, udev_disk("nvme.txt", 960 * GB)], DiskSelector(), NEED)
    assert choice.disk.name == "mmcblk0"
    assert reasons(choice.rejected)["nvme0n1"] == "/dev/mmcblk0 is preferred"
    assert reasons(choice.rejected)["mmcblk0boot0"] == "read-only"
