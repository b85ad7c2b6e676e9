"""Agent orchestration: preflight before any write, wipe and report after a failure."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from bootenv import agent, agent_disk, agent_plan, bootloader
from bootenv.blockmap import BlockMap, data_extents
from bootenv.cmdline import parse_cmdline
from bootenv.disks import DiskChoice, DiskInfo
from bootenv.errors import BootenvError, FatalError, UserError, VerificationError
from bootenv.manifest import Blob, Component, Manifest, OsImage, RootFs, Source
from bootenv.partition import MiB, plan_partitions, required_size

ROOT_MIN = 64 * MiB
HTTP_IMG = "bootenv.image=http://10.0.2.2:8080/img"
BLOB = Blob("0" * 64 + ".img.zst", "0" * 64, 1, 1)
MANIFEST = Manifest(
    Source("gold", "Debian", "amd64", "6.1", "now"),
    RootFs("ext4", ROOT_MIN, ROOT_MIN, 4096),
    OsImage(BLOB, BLOB, (), 0),
    (),
)


SINGLE = OsImage(Blob("1" * 64 + ".img.zst", "1" * 64, 1, 1), BLOB, ("apache2", "base-files"), 9)
LAMP = replace(
    MANIFEST,
    components=(
        Component("apache", BLOB, ("apache2",), (), 1, ("apache2.service",)),
        Component("php", BLOB, ("php",), ("apache",), 1, ()),
    ),
    single=SINGLE,
)


def need(image: int) -> int:
    """The root the agent asks for, for an image of `image` bytes and no components."""
    return agent_plan.RootNeeds(image, "the OS sub-image", (), 0, agent_plan.AGENT_ADDS).total


def all_valid(events: list[dict[str, object]]) -> bool:
    """Every event the agent posts is one `bootenv serve` accepts."""
    from bootenv.event_schema import parse_event

    return all(parse_event(e).source == "agent" for e in events)


def digest(path: Path) -> str:
    """The file's size, where its data lies and what it holds (its holes read as zeros,
    and a write, even of zeros, into one makes data there): any write changes it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        for offset, length in data_extents(f.fileno(), size):
            h.update(f"{offset}+{length}".encode())
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def fake_disk(tmp_path: Path, size: int) -> Path:
    """A sparse disk image with random bytes wherever the agent might write."""
    path = tmp_path / "disk.img"
    plan = plan_partitions(max(size, required_size(ROOT_MIN)), 512, ROOT_MIN)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, size - MiB, plan.bios.offset, plan.esp.offset, plan.root.offset):
            if offset + MiB <= size:
                os.pwrite(f.fileno(), os.urandom(MiB), offset)
    return path


def setup(monkeypatch: pytest.MonkeyPatch, disk: Path) -> list[str]:
    wiped: list[str] = []
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, MANIFEST, None))
    # The OS sub-image's block map, as the manifest's rootfs gives its size.
    monkeypatch.setattr(
        agent, "load_checked", lambda source, m, which: BlockMap(m.rootfs.image_size, 4096, ())
    )
    info = DiskInfo(str(disk), disk.stat().st_size)
    monkeypatch.setattr(agent_disk, "choose", lambda cfg, need, needs="": DiskChoice(info, ()))
    monkeypatch.setattr(bootloader, "check_available", lambda: None)
    monkeypatch.setattr(agent_disk, "wipe_disk", lambda d, plan: wiped.append(d))
    return wiped


def test_preflight_plans_a_disk_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1024 * MiB)
    plan = agent_disk.preflight(str(path), ROOT_MIN)
    assert plan == plan_partitions(1024 * MiB, 512, ROOT_MIN)


def test_preflight_refuses_what_is_not_a_disk(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        agent_disk.preflight(str(tmp_path / "nope"), ROOT_MIN)
    with pytest.raises(UserError, match="neither a disk"):
        agent_disk.preflight(str(tmp_path), ROOT_MIN)


def test_too_small_disk_is_refused_before_any_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)) - MiB)
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    cfg = parse_cmdline(f"bootenv.image=/img bootenv.callback={url}")
    with pytest.raises(UserError, match="too small"):
        agent.run_agent(cfg)
    assert digest(disk) == before
    assert written == [] and wiped == []
    assert got[-1]["event"] == "error" and got[-1]["fatal"] is True
    assert "too small" in str(got[-1]["message"])
    assert list(got[-1]["data"]["timings"]) == ["manifest", "disk"]  # type: ignore[index]
    assert all_valid(got)


def test_failure_after_touching_the_disk_wipes_and_reports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)))
    wiped = setup(monkeypatch, disk)

    def broken(*args: object) -> None:
        raise FatalError("the network fell over")

    monkeypatch.setattr(agent, "_write_disk", broken)
    cfg = parse_cmdline(f"bootenv.image=/img bootenv.callback={url} bootenv.hostname=h1")
    with pytest.raises(FatalError, match="network fell over"):
        agent.run_agent(cfg)
    assert wiped == [str(disk)]
    assert got[0]["event"] == "start" and got[0]["data"] == {"hostname": "h1", "image": "/img"}
    assert got[-1]["event"] == "error" and got[-1]["message"] == "the network fell over"
    done = [e["step"] for e in got if e["event"] == "step" and e["status"] == "done"]
    assert done == ["manifest", "disk", "preflight"]
    assert all_valid(got)


def test_wipe_disk_zeroes_tables_and_signatures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    size = required_size(ROOT_MIN)
    disk = fake_disk(tmp_path, size)
    plan = plan_partitions(size, 512, ROOT_MIN)
    ran: list[list[str]] = []
    monkeypatch.setattr(agent_disk, "run", lambda argv, **kw: ran.append([str(a) for a in argv]))
    monkeypatch.setattr(agent_disk, "which", lambda tool: tool)
    agent_disk.wipe_disk(str(disk), plan)
    with open(disk, "rb") as f:
        for offset in (0, size - MiB, plan.bios.offset, plan.esp.offset, plan.root.offset):
            assert os.pread(f.fileno(), MiB, offset) == bytes(MiB)
    assert ran == [["wipefs", "-a", str(disk)]]


def test_trust_reads_builtin_keys(tmp_path: Path) -> None:
    import base64

    (tmp_path / "ops.pub").write_text("ed25519 " + base64.b64encode(b"k" * 32).decode() + "\n")
    fp = "sha256:" + "1" * 64
    cfg = parse_cmdline(f"bootenv.image=/img bootenv.trust={fp}")
    trust = agent.trust(cfg, tmp_path)
    assert trust.keys == (b"k" * 32,) and trust.fingerprints == (fp,) and not trust.insecure


def test_cli_agent_reads_the_cmdline_file_and_overrides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bootenv import cli, target
    from bootenv.cmdline import AgentConfig, Handoff

    seen: list[tuple[AgentConfig, str]] = []
    handed: list[Handoff] = []
    plan = plan_partitions(required_size(ROOT_MIN), 512, ROOT_MIN)
    ident = target.Identity("u" * 36, "1a2b3c4d", "web1")

    def fake_run(cfg: AgentConfig, *, ramdisk_cmdline: str = "") -> agent.AgentResult:
        seen.append((cfg, ramdisk_cmdline))
        return agent.AgentResult("/dev/vda", plan, ident, (), None, bootloader.BootPlan(bios=True, efi=True))

    monkeypatch.setattr(agent, "run_agent", fake_run)
    monkeypatch.setattr(agent, "finish", lambda cfg, result: handed.append(cfg.handoff))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 bootenv.image=http://10.0.2.2/img bootenv.handoff=reboot\n")
    code = cli.main(["agent", "--cmdline", str(cmdline), "--disk", "/dev/vda", "--ssh-key", "ssh-rsa AAA x"])
    assert code == 0
    cfg, text = seen[0]
    assert (cfg.image, cfg.disk.value, cfg.ssh_key) == ("http://10.0.2.2/img", "/dev/vda", "ssh-rsa AAA x")
    assert text.startswith("console=ttyS0") and handed == [Handoff.REBOOT]
    cmdline.write_text("bootenv.image=http://10.0.2.2/img bootenv.colour=blue\n")
    assert cli.main(["agent", "--cmdline", str(cmdline)]) == 2


def test_plan_split_writes_the_os_and_lays_out_the_chosen_components() -> None:
    plan = agent_plan.plan_install(parse_cmdline(f"{HTTP_IMG} bootenv.components=php"), LAMP)
    assert (plan.which, plan.image) == ("os", LAMP.os)
    assert plan.layout == plan.installed == ("apache", "php")  # php needs apache
    none = agent_plan.plan_install(parse_cmdline("bootenv.image=/img bootenv.components=none"), LAMP)
    assert none.layout == none.installed == ()


def test_plan_single_writes_the_single_image_and_lays_out_nothing() -> None:
    plan = agent_plan.plan_install(parse_cmdline("bootenv.image=/img bootenv.single=1"), LAMP)
    assert (plan.which, plan.image) == ("single", SINGLE)
    assert plan.layout == ()  # the layout service only reports os_booted and done
    assert plan.installed == ("apache", "php")
    assert plan.describe() == "single image"


def test_single_mode_without_a_single_image_stops_before_the_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(ROOT_MIN))
    before = digest(disk)
    wiped = setup(monkeypatch, disk)  # MANIFEST has no single image
    cfg = parse_cmdline(f"bootenv.image=/img bootenv.single bootenv.callback={url}")
    with pytest.raises(UserError, match="has no single image") as info:
        agent.run_agent(cfg)
    assert "\n" not in str(info.value)
    assert digest(disk) == before and wiped == []
    assert (got[-2]["step"], got[-2]["status"]) == ("manifest", "failed")
    assert got[-1]["event"] == "error" and "no single image" in str(got[-1]["message"])
    assert all_valid(got)


def test_single_mode_sizes_the_disk_by_the_single_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    """The single image is bigger than the OS sub-image; the disk must fit it."""
    url, _ = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)))  # fits the OS sub-image only
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, LAMP, None))
    asked: list[str] = []

    def blockmap(source: object, manifest: Manifest, which: str) -> BlockMap:
        asked.append(which)
        return BlockMap(2 * ROOT_MIN, 4096, ())

    monkeypatch.setattr(agent, "load_checked", blockmap)
    cfg = parse_cmdline(f"bootenv.image=/img bootenv.single bootenv.callback={url}")
    with pytest.raises(UserError, match="too small"):
        agent.run_agent(cfg)
    assert asked == ["single"] and wiped == []


def test_single_mode_writes_the_single_image_and_reports_like_split(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(2 * ROOT_MIN)))
    setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, LAMP, None))
    bmap = BlockMap(2 * ROOT_MIN, 4096, ())
    monkeypatch.setattr(agent, "load_checked", lambda source, manifest, which: bmap)
    seen: list[agent_plan.Image] = []

    def write_disk(cfg: object, disk: str, layout: object, image: agent_plan.Image, *rest: object) -> None:
        seen.append(image)

    monkeypatch.setattr(agent, "_write_disk", write_disk)
    result = agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.single bootenv.callback={url}"))
    assert seen[0].install.which == "single" and seen[0].bmap is bmap
    assert result.components == ("apache", "php")
    assert result.plan.root.size >= 2 * ROOT_MIN
    last = got[-1]
    assert (last["step"], last["status"]) == ("handoff", "start")
    assert last["data"]["image"] == "single"  # type: ignore[index]
    assert last["data"]["components"] == ["apache", "php"]  # type: ignore[index]
    assert all_valid(got)


def test_first_boot_checks_the_image_with_the_key_the_agent_trusted(tmp_path: Path) -> None:
    """A key built into the ramdisk is not on the target: the hand-off names it by its
    fingerprint, and the first-boot layout's command checks the image against it."""
    from bootenv.signing import Trust, keygen, sign
    from bootenv.target import layout_argv
    from bootenv.trusted import open_signed
    from tests.unit.test_signing import make_image

    image = make_image(tmp_path / "img")
    keygen(tmp_path / "k")
    (image / "manifest.json.sig").write_bytes(sign((image / "manifest.json").read_bytes(), tmp_path / "k"))
    builtin = tmp_path / "trusted"
    builtin.mkdir()
    (builtin / "k.pub").write_bytes((tmp_path / "k.pub").read_bytes())
    # Served over http (a directory on the ramdisk cannot give the target components).
    cfg = parse_cmdline(f"{HTTP_IMG} bootenv.components=web")
    source, manifest, signer = open_signed(str(image), agent.trust(cfg, builtin))
    assert signer is not None and signer.startswith("sha256:")
    bmap = BlockMap(manifest.rootfs.image_size, 4096, ())
    opened = agent_plan.Image(manifest, source, agent_plan.plan_install(cfg, manifest), bmap, signer)
    argv = layout_argv(agent_plan.layout_handoff(cfg, opened, "web1"))
    assert argv[argv.index("--fingerprint") + 1] == signer and "--insecure" not in argv
    # What the target's layout then trusts: that fingerprint alone, and it verifies.
    assert open_signed(str(image), Trust(fingerprints=(signer,)))[2] == signer


def test_a_disk_that_fits_min_size_but_not_the_image_is_refused_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    """The manifest may give min_size below image_size (docs/FORMAT.md), and the OS
    sub-image is written whole: sizing the disk by min_size let preflight pass a disk
    that was then wiped and failed."""
    url, got = events
    big = replace(MANIFEST, rootfs=RootFs("ext4", 4 * ROOT_MIN, ROOT_MIN, 4096))
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)) + 4 * MiB)  # fits min_size only
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, big, None))
    asked: list[int] = []

    def choose(cfg: object, need: int, needs: str = "") -> DiskChoice:
        asked.append(need)
        return DiskChoice(DiskInfo(str(disk), disk.stat().st_size), ())

    monkeypatch.setattr(agent_disk, "choose", choose)
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    with pytest.raises(UserError, match="too small"):
        agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.callback={url}"))
    assert digest(disk) == before
    assert written == [] and wiped == []
    assert asked == [required_size(need(4 * ROOT_MIN), 4096)]  # the disk rule is told the same
    assert got[-1]["event"] == "error" and "too small" in str(got[-1]["message"])


def test_preflight_refuses_a_disk_of_a_partial_sector_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """parted sees whole sectors only: such a disk got through preflight, then wipefs ran
    and writing the table failed (the plan ended past the last whole sector)."""
    size = required_size(ROOT_MIN) + 64 * MiB + 100
    disk = fake_disk(tmp_path, size)
    before = digest(disk)
    with pytest.raises(UserError, match=f"{size} bytes, not a whole number of its 512-byte sectors"):
        agent_disk.preflight(str(disk), ROOT_MIN)
    wiped = setup(monkeypatch, disk)
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    with pytest.raises(UserError, match="not a whole number"):
        agent.run_agent(parse_cmdline("bootenv.image=/img"))
    assert digest(disk) == before and written == [] and wiped == []


def test_a_ramdisk_directory_image_with_components_is_refused_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first-boot layout would be handed a path on the ramdisk, which the installed
    system does not have: its components could never be laid out."""
    disk = fake_disk(tmp_path, required_size(ROOT_MIN))
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, LAMP, None))
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    for components in ("", " bootenv.components=php"):  # all, by default; or some
        with pytest.raises(UserError, match="is a directory on the ramdisk") as info:
            agent.run_agent(parse_cmdline(f"bootenv.image=/srv/img{components}"))
        assert "\n" not in str(info.value) and "bootenv.components=none" in str(info.value)
    assert digest(disk) == before and written == [] and wiped == []
    # Nothing to lay out: allowed. Served over http: laid out on first boot.
    for words in ("bootenv.components=none", "bootenv.single"):
        assert agent_plan.plan_install(parse_cmdline(f"bootenv.image=/srv/img {words}"), LAMP).layout == ()
    assert agent_plan.plan_install(parse_cmdline("bootenv.image=/srv/img"), MANIFEST).layout == ()
    served = agent_plan.plan_install(parse_cmdline(f"{HTTP_IMG} bootenv.components=php"), LAMP)
    assert served.layout == ("apache", "php")


def test_a_passed_on_argument_that_is_not_ascii_is_refused_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """console= goes into grub.cfg and kexec's command line: a byte that is not UTF-8
    (kept as a surrogate) would only fail once grub.cfg is written, on a wiped disk."""
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)))
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    text = b"bootenv.image=/img console=ttyS0,115200\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(UserError, match=r"console=ttyS0,115200\\xe9 is not printable ASCII"):
        agent.run_agent(parse_cmdline(text), ramdisk_cmdline=text)
    assert digest(disk) == before and written == [] and wiped == []
    agent_plan.check_passed_on("bootenv.image=/img console=ttyS0 caf\udce9 nomodeset")  # not passed on


@pytest.mark.parametrize(
    "arg", ['console="ttyS0,115200 keep"', "console=tty0;reboot", "console=$x", "earlyprintk=a#b"]
)
def test_passed_on_arguments_grub_cfg_would_split_or_run_are_refused(arg: str) -> None:
    """They go unquoted into grub.cfg's linux line and kexec's --command-line."""
    with pytest.raises(UserError, match=r"grub\.cfg cannot take"):
        agent_plan.check_passed_on(f"bootenv.image=/img {arg}")
    agent_plan.check_passed_on("bootenv.image=/img console=ttyS0,115200n8 console=tty0 nomodeset")


OLD_OS = b"\xeb\x63\x90old os boot sector".ljust(510, b"\0") + b"\x55\xaa"


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        ("no block map", r"\.bmap\.json is missing from the image"),
        ("block map pin", r"\.bmap\.json does not match its sha256"),
        ("image size", "image size disagrees with the manifest"),
        ("no data blob", r"\.img\.zst is missing from the image"),
    ],
)
def test_an_image_that_cannot_be_written_leaves_the_old_disk_untouched(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    events: tuple[str, list[dict[str, object]]],
    broken: str,
    error: str,
) -> None:
    """The block map (and the data blob) used to be fetched by write_os, after wipefs
    and the new partition table: a broken image destroyed the old system, then failed."""
    from bootenv.manifest import MANIFEST as MANIFEST_JSON
    from bootenv.manifest import parse_manifest
    from bootenv.oswrite import load_checked
    from bootenv.source import DirSource
    from tests.unit.test_oswrite import build_image

    url, got = events
    image = build_image(tmp_path).dir
    manifest = parse_manifest((image / MANIFEST_JSON).read_bytes())
    if broken == "no block map":
        (image / manifest.os.blockmap.file).unlink()
    elif broken == "block map pin":
        path = image / manifest.os.blockmap.file
        path.write_bytes(path.read_bytes().replace(b"4096", b"8192", 1))
    elif broken == "image size":
        manifest = replace(
            manifest, rootfs=replace(manifest.rootfs, image_size=manifest.rootfs.image_size + MiB)
        )
    else:
        (image / manifest.os.data.file).unlink()
    disk = fake_disk(tmp_path, required_size(ROOT_MIN))
    with open(disk, "r+b") as f:
        f.write(OLD_OS)
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image_url, trust: (DirSource(image), manifest, None))
    monkeypatch.setattr(agent, "load_checked", load_checked)
    ran: list[str] = []

    def run(argv: list[object], **kw: object) -> None:
        # wipefs "runs" and the partition table is written for real; losetup cannot.
        ran.append(str(argv[0]))
        if "losetup" in str(argv[0]):
            raise FatalError("no losetup in a unit test")

    for module in (agent, agent_disk):  # wipefs at the partition step; losetup, wipefs to wipe
        monkeypatch.setattr(module, "run", run)
        monkeypatch.setattr(module, "which", lambda tool: tool)
    with pytest.raises(BootenvError) as info:
        agent.run_agent(parse_cmdline(f"bootenv.image=/img bootenv.callback={url}"))
    assert digest(disk) == before and ran == [] and wiped == []
    assert isinstance(info.value, (UserError, VerificationError)) and "\n" not in str(info.value)
    assert re.search(error, str(info.value)) and re.search(error, str(got[-1]["message"]))
    assert disk.read_bytes()[:512] == OLD_OS
    assert (got[-2]["step"], got[-2]["status"]) == ("manifest", "failed")
    assert got[-1]["event"] == "error" and got[-1]["fatal"] is True
    assert all_valid(got)


def test_a_disk_named_by_a_symlink_is_the_disk_it_points_to(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """udev lists disks by their node: bootenv.disk=/dev/disk/by-id/... said "no such disk"."""
    from bootenv.cmdline import DiskKind, DiskSelector

    by_id = tmp_path / "dev/disk/by-id"
    by_id.mkdir(parents=True)
    (by_id / "nvme-Samsung_SSD_980_S64").symlink_to("/dev/nvme0n1")
    (by_id / "wwn-0x5000").symlink_to("../../../sdb")  # udev's links are relative
    (tmp_path / "sdb").touch()
    disks = [DiskInfo("/dev/nvme0n1", 512 * MiB), DiskInfo(str(tmp_path / "sdb"), 512 * MiB)]
    monkeypatch.setattr(agent_disk, "read_disks", lambda: disks)
    cfg = parse_cmdline("bootenv.image=/img")
    for link, node in (("nvme-Samsung_SSD_980_S64", "/dev/nvme0n1"), ("wwn-0x5000", str(tmp_path / "sdb"))):
        named = replace(cfg, disk=DiskSelector(DiskKind.DEVICE, str(by_id / link)))
        choice = agent_disk.choose(named, ROOT_MIN)
        assert choice.disk.devnode == node
        assert [r.disk.devnode for r in choice.rejected] == [d.devnode for d in disks if d.devnode != node]
    gone = replace(cfg, disk=DiskSelector(DiskKind.DEVICE, str(by_id / "ata-gone")))
    with pytest.raises(UserError, match=r"by-id/ata-gone: no such disk"):
        agent_disk.choose(gone, ROOT_MIN)
