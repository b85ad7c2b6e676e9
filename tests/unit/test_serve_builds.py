"""`bootenv serve --boot DIR`: a machine gets the kernel and initramfs of one build, even
when `build-ramdisk -o DIR` swaps DIR between its two fetches.

Before, the scripts fetched `/boot/vmlinuz` then `/boot/initramfs.img`, URLs that name
no build: a machine whose kernel came just before a swap and whose initramfs came just
after booted a kernel with another kernel's modules, and its agent found no drivers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootenv import bootfiles, ramdisk, ramdisk_export
from bootenv.machines import assign
from bootenv.serve import BootenvServer, ServeConfig, running
from bootenv.state import Store
from tests.serveimage import make_image
from tests.unit.test_serve import MAC, get, script

Pair = tuple[bytes, bytes]


def pair(tag: str) -> Pair:
    return f"{tag} kernel".encode() * 100, f"{tag} initramfs, modules for the {tag} kernel".encode() * 300


def export(tmp_path: Path, tag: str) -> str:
    """`build-ramdisk -o tmp_path/boot` of a build whose files are `pair(tag)`: its id."""
    cache = tmp_path / "cache" / tag
    cache.mkdir(parents=True)
    kernel, initrd = pair(tag)
    (cache / "vmlinuz").write_bytes(kernel)
    (cache / "initramfs.img").write_bytes(initrd)
    rd = ramdisk.Ramdisk(cache / "vmlinuz", cache / "initramfs.img", "6.1.0-" + tag, "k" * 16, True)
    build = ramdisk_export.export(rd, tmp_path / "boot").build
    assert build is not None
    return build


@pytest.fixture
def boot_server(tmp_path: Path) -> Iterator[BootenvServer]:
    make_image(tmp_path / "images")
    export(tmp_path, "first")
    config = ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0, boot=tmp_path / "boot")
    with running(config) as srv:
        Store(config.state).put(assign(MAC, "lamp", "all", now=time.time()))
        yield srv


def named(text: str) -> tuple[str, str]:
    """The kernel's and the initramfs's URLs a provisioning script fetches."""
    kernel = re.search(r"^kernel (\S+) ", text, re.M)
    initrd = re.search(r"^initrd --name initramfs.img (\S+) ", text, re.M)
    assert kernel and initrd, text
    return kernel[1], initrd[1]


def retried(text: str) -> str:
    """The URL a provisioning script's retry fetches the script again from."""
    again = re.search(r"^chain --replace --autofree (\S+) \|\|$", text, re.M)
    assert again, text
    return again[1]


def fetch(srv: BootenvServer, url: str) -> tuple[int, bytes]:
    assert url.startswith(srv.base_url), url
    status, _, body = get(srv, url[len(srv.base_url) :])
    return status, body


def test_a_script_names_the_current_build(boot_server: BootenvServer, tmp_path: Path) -> None:
    build = bootfiles.noted(tmp_path / "boot")
    kernel, initrd = pair("first")
    assert build == bootfiles.build_id(*(hashlib.sha256(b).digest() for b in (kernel, initrd)))
    k_url, i_url = named(script(boot_server, MAC))
    assert (k_url, i_url) == tuple(f"{boot_server.base_url}/boot/{build}/{n}" for n in bootfiles.PAIR)
    assert fetch(boot_server, k_url) == (200, kernel)
    assert fetch(boot_server, i_url) == (200, initrd)


def test_a_machine_between_its_two_fetches_gets_the_pair_its_script_named(
    boot_server: BootenvServer, tmp_path: Path
) -> None:
    """The kernel fetched before a swap, the initramfs after it: both of the build the
    script named. Scripts made after the swap name the new build, whose pair is whole."""
    first_script = script(boot_server, MAC)
    k_url, i_url = named(first_script)
    assert fetch(boot_server, k_url) == (200, pair("first")[0])
    second = export(tmp_path, "second")  # the admin's build-ramdisk -o, meanwhile
    assert fetch(boot_server, i_url) == (200, pair("first")[1])
    assert fetch(boot_server, k_url) == (200, pair("first")[0])  # a retry of the same URLs, too
    k2, i2 = named(script(boot_server, MAC))
    assert second in k2 and second in i2
    assert (fetch(boot_server, k2), fetch(boot_server, i2)) == (
        (200, pair("second")[0]),
        (200, pair("second")[1]),
    )
    # The URLs that name no build are the current build's: static scripts, the demo.
    assert get(boot_server, "/boot/vmlinuz")[2] == pair("second")[0]
    assert get(boot_server, "/boot/initramfs.img")[2] == pair("second")[1]


def test_a_build_two_swaps_old_is_a_404_that_says_so_and_the_retry_recovers(
    boot_server: BootenvServer, tmp_path: Path
) -> None:
    text = script(boot_server, MAC)
    k_url, i_url = named(text)
    again = retried(text)
    assert again == f"{boot_server.base_url}/ipxe/machine?mac={MAC}"
    export(tmp_path, "second")
    third = export(tmp_path, "third")
    for url in (k_url, i_url):
        status, body = fetch(boot_server, url)
        assert status == 404
        why = json.loads(body)["error"]
        assert f"is neither the current build ({third}) nor the one before it: build-ramdisk -o" in why
    # The script's retry fetches the script again, which names the build DIR holds now.
    status, body = fetch(boot_server, again)
    k3, i3 = named(body.decode())
    assert status == 200 and third in k3
    assert (fetch(boot_server, k3), fetch(boot_server, i3)) == (
        (200, pair("third")[0]),
        (200, pair("third")[1]),
    )


def test_an_unknown_build_is_a_404(boot_server: BootenvServer) -> None:
    status, _, body = get(boot_server, "/boot/0123456789abcdef/vmlinuz")
    assert (
        status == 404 and "ramdisk build 0123456789abcdef is neither the current" in json.loads(body)["error"]
    )
    assert get(boot_server, "/boot/0123456789abcdef/ramdisk.json")[0] == 404


@pytest.mark.parametrize(
    "path", ["/boot/0123456789abcdef%2f..%2f..%2fsecret", "/boot/0123456789abcdef/..%2f..%2fsecret"]
)
def test_a_build_url_cannot_leave_the_boot_dir(boot_server: BootenvServer, tmp_path: Path, path: str) -> None:
    (tmp_path / "secret").write_text("top secret")
    status, _, body = get(boot_server, path)
    assert status in (403, 404) and b"top secret" not in body


def test_a_build_dir_that_leads_out_of_boot_is_never_named_nor_served(
    boot_server: BootenvServer, tmp_path: Path
) -> None:
    """A symlink in the build's place (nginx refuses it too): the script names no build,
    and its URLs are refused."""
    boot = tmp_path / "boot"
    build = bootfiles.noted(boot)
    assert build is not None
    (tmp_path / "elsewhere").mkdir()
    for name in bootfiles.PAIR:
        (boot / build / name).rename(tmp_path / "elsewhere" / name)
    (boot / build).rmdir()
    (boot / build).symlink_to(tmp_path / "elsewhere")
    k_url, i_url = named(script(boot_server, MAC))
    assert (k_url, i_url) == tuple(f"{boot_server.base_url}/boot/{n}" for n in bootfiles.PAIR)
    assert get(boot_server, f"/boot/{build}/vmlinuz")[0] == 403


def test_a_boot_dir_whose_note_names_a_build_it_lacks_gets_scripts_that_name_none(
    boot_server: BootenvServer, tmp_path: Path
) -> None:
    """`cp build/ramdisk/* /srv/boot` copies the three files, not the builds' dirs: the
    scripts must not name a build that is not there."""
    boot = tmp_path / "boot"
    build = bootfiles.noted(boot)
    assert build is not None
    for name in bootfiles.PAIR:
        (boot / build / name).unlink()
    (boot / build).rmdir()
    k_url, i_url = named(script(boot_server, MAC))
    assert (k_url, i_url) == tuple(f"{boot_server.base_url}/boot/{n}" for n in bootfiles.PAIR)
    assert fetch(boot_server, k_url) == (200, pair("first")[0])
