"""How big a root the agent asks for: the image, the components the first-boot layout
lays out, and what the agent adds itself.

It sized the root for the image alone, while `bootenv.components=all` is the default:
a disk of the smallest size it took was wiped, written and reported provisioned with
187 MiB free, and the first boot's layout of LAMP's components (370 MiB of tar) failed
with ENOSPC. Such a disk is refused now, before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from bootenv import agent, agent_disk, agent_plan
from bootenv.blockmap import BlockMap
from bootenv.cmdline import parse_cmdline
from bootenv.disks import DiskInfo
from bootenv.errors import UserError
from bootenv.manifest import Blob, Component
from bootenv.partition import MiB, describe_need, required_size
from tests.unit.test_agent import HTTP_IMG, MANIFEST, ROOT_MIN, SINGLE, digest, fake_disk, need, setup


def blob(raw: int) -> Blob:
    return Blob("0" * 64 + ".tar.zst", "0" * 64, raw // 4, raw)


# LAMP's components as captured: their tars' bytes and their files.
LAMP = replace(
    MANIFEST,
    components=(
        Component("apache", blob(49_786_880), ("apache2",), (), 862, ()),
        Component("mysql", blob(307_343_360), ("mariadb-server",), (), 896, ()),
        Component("php", blob(31_098_880), ("php",), ("apache",), 361, ()),
    ),
)
TAR = {c.name: c.data.raw_size + c.files * 4096 for c in LAMP.components}  # at most, laid out


def needs(words: str) -> agent_plan.RootNeeds:
    cfg = parse_cmdline(f"{HTTP_IMG} {words}")
    return agent_plan.root_needs(LAMP, agent_plan.plan_install(cfg, LAMP), BlockMap(ROOT_MIN, 4096, ()))


def test_the_root_holds_the_image_the_chosen_components_and_what_the_agent_adds() -> None:
    grown = 64 / 63  # the grown filesystem's new inode tables take 1/64 of it
    every = needs("")  # bootenv.components=all, the default
    assert (every.image, every.components, every.agent) == (ROOT_MIN, ("apache", "mysql", "php"), 80 * MiB)
    assert every.laid_out == sum(TAR.values())
    assert every.total == pytest.approx(ROOT_MIN + (sum(TAR.values()) + 80 * MiB) * grown, abs=1)
    php = needs("bootenv.components=php")  # and apache, which it needs
    assert php.components == ("apache", "php") and php.laid_out == TAR["apache"] + TAR["php"]
    none = needs("bootenv.components=none")
    assert none.laid_out == 0 and none.total == need(ROOT_MIN) > ROOT_MIN + 80 * MiB
    # The single image holds the components: its own size, and what the agent adds.
    cfg = parse_cmdline("bootenv.image=/img bootenv.single")
    lamp = replace(LAMP, single=SINGLE)
    single = agent_plan.root_needs(lamp, agent_plan.plan_install(cfg, lamp), BlockMap(3 * ROOT_MIN, 4096, ()))
    assert (single.image, single.laid_out, single.total) == (3 * ROOT_MIN, 0, need(3 * ROOT_MIN))
    assert every.describe() == (
        "the OS sub-image (64.0 MiB), the components apache, mysql, php (up to 378.5 MiB laid out), "
        "bootenv's runtime and grub (80.0 MiB) and the grown filesystem's inode tables (7.3 MiB)"
    )


def test_a_disk_that_holds_the_image_but_not_the_components_is_refused_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    """The reviewer's disk: the smallest the agent took, sized by the image alone."""
    url, got = events
    disk = fake_disk(tmp_path, required_size(need(ROOT_MIN)))  # the image and the agent's own
    before = digest(disk)
    wiped = setup(monkeypatch, disk)
    monkeypatch.setattr(agent, "open_signed", lambda image, trust: (None, LAMP, None))
    written: list[str] = []
    monkeypatch.setattr(agent, "_write_disk", lambda *a: written.append("x"))
    with pytest.raises(UserError) as info:
        agent.run_agent(parse_cmdline(f"{HTTP_IMG} bootenv.callback={url}"))
    message = str(info.value)
    assert message.startswith(
        "the disk is too small: 408.0 MiB, it needs 792.0 MiB: a root of 530.0 MiB for "
    )
    assert "the components apache, mysql, php (up to 378.5 MiB laid out)" in message and "\n" not in message
    assert digest(disk) == before and written == [] and wiped == []
    assert got[-1]["event"] == "error" and got[-1]["message"] == message
    assert (got[-2]["step"], got[-2]["status"]) == ("preflight", "failed")
    # A disk the size asked for is taken.
    disk.unlink()
    fake_disk(tmp_path, required_size(needs("").total))
    agent.run_agent(parse_cmdline(f"{HTTP_IMG} bootenv.callback={url}"))
    assert written == ["x"]


def test_the_disk_rule_says_what_a_disk_too_small_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that udev lists is checked against the size first, by choose_disk: its
    refusal says how much is needed, and for what, too."""
    monkeypatch.setattr(agent_disk, "read_disks", lambda: [DiskInfo("/dev/vdb", 512 * MiB)])
    every = needs("")
    cfg = parse_cmdline(f"{HTTP_IMG} bootenv.disk=/dev/vdb")
    need_text = describe_need(every.total, 4096, every.describe())
    with pytest.raises(UserError) as info:
        agent_disk.choose(cfg, required_size(every.total, 4096), need_text)
    assert str(info.value) == (
        "no disk to install on (/dev/vdb): /dev/vdb: too small (512 MiB, the image needs 793 MiB); "
        f"the disk needs {need_text}"
    )
    assert need_text.startswith(
        "792.0 MiB: a root of 530.0 MiB for the OS sub-image (64.0 MiB), the components"
    )


def test_what_the_agent_adds_fits_its_allowance(tmp_path: Path, allow_run: None) -> None:
    """bootenv's runtime and grub's modules, as the agent installs them from here (the
    ramdisk's own measured the same: agent_plan.AGENT_ADDS), take no more than it counts."""
    from bootenv.bootloader import GRUB_LIB, copy_modules
    from bootenv.runtime import install_runtime

    if not all((GRUB_LIB / p).is_dir() for p in ("i386-pc", "x86_64-efi")):
        pytest.skip("grub's files are not installed (run `make deps`)")
    install_runtime(tmp_path)
    copy_modules(tmp_path)
    taken = sum(
        os.lstat(Path(d, n)).st_blocks * 512 for d, dirs, files in os.walk(tmp_path) for n in (*dirs, *files)
    )
    assert 40 * MiB < taken <= agent_plan.AGENT_ADDS
