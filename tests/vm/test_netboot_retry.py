"""The provisioning script's failure path, in real iPXE against a real `bootenv serve`.

bootenv/menu.py `provision_script`: a failed load fetches the machine's script again
(`chain --replace`), its count of tries (`bootenv-loads`, an int32 setting) carried over
to the new script, which gives up after three. A VM netboots through QEMU's iPXE ROM
(TFTP boot.ipxe, then HTTP), under SeaBIOS and under OVMF, with no disk and no OS to
install, and is stopped as soon as the outcome is on record:

- a build whose kernel is not a kernel: three scripts, three failed loads, then the
  script gives up with its message on the console;
- a build gone between the script and its fetch (build-ramdisk -o ran twice): the load
  is a 404, the script fetched again names the current build, whose kernel boots.

What serve answered comes from its request log (`bootenv.httpconn` at debug level), which
is also where the second test swaps --boot DIR: the log line is written as the script's
answer starts, before iPXE has read it, so the swap always falls between the script
being made and its kernel being fetched. Each wait also ends on what a broken script
would do instead (a fourth try, a give-up), so that such a script fails in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from bootenv import httpconn
from bootenv.lab import EMBED, EMBED_URL, GUEST_HOST
from bootenv.machines import assign
from bootenv.menu import RAMDISK_INITRD, RAMDISK_KERNEL
from bootenv.qemu import Vm, VmSpec, free_port, ovmf_code
from bootenv.ramdisk import Ramdisk
from bootenv.serve import ServeConfig, running
from tests.conftest import require_tools
from tests.vm.qemu import cached_ramdisk

MAC = "52:54:00:00:00:e5"
OLD, NEW = "a0" * 8, "b1" * 8  # build ids: 16 hex digits, as bootenv/bootfiles.py has them
RETRYING = "bootenv: could not load the ramdisk, retrying in 5 s"
GAVE_UP = "bootenv: the ramdisk did not load"
TRY = "bootenv: installing "  # the first line each script prints
TIMEOUT = 300.0  # TCG on a busy 2-core machine; each VM takes well under a minute when idle
# Serve's request log: `"GET /path HTTP/1.1" 200 -`, as http.server writes it.
REQUEST = re.compile(r'"GET (\S+) HTTP/1\.[01]" (\d{3}) ')


@pytest.fixture(scope="module")
def ramdisk() -> Ramdisk:
    require_tools("qemu-system-x86_64")
    if not Path("/usr/lib/ipxe/qemu/efi-virtio.rom").exists():
        pytest.skip("QEMU's iPXE ROMs are missing (ipxe-qemu)")
    return cached_ramdisk()


class Requests(logging.Handler):
    """Serve's answers, in order, as (path, status); `on_script` runs as the first script's
    answer starts, before iPXE has read it."""

    def __init__(self, on_script: Callable[[], None] | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, int]] = []
        self._on_script = on_script

    def emit(self, record: logging.LogRecord) -> None:
        m = REQUEST.search(record.getMessage())
        if m is None:
            return
        path, status = m.group(1), int(m.group(2))
        self.seen.append((path, status))
        if self._on_script is not None and path.startswith("/ipxe/machine"):
            on_script, self._on_script = self._on_script, None
            on_script()

    def paths(self) -> list[tuple[str, int]]:
        """Every answer but the entry script's, with the script's query left off."""
        return [(p.partition("?")[0], s) for p, s in self.seen if p != "/ipxe/boot.ipxe"]


def export(boot: Path, build: str, kernel: Path, initrd: Path, *, keep: str | None = None) -> None:
    """--boot DIR as build-ramdisk -o leaves it (bootenv/bootfiles.py): the current pair
    under its own names and under its build's id, and the note naming it; `keep` is the
    build before, kept under its id; any other build is gone."""
    for entry in boot.iterdir() if boot.exists() else ():
        if entry.name == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (boot / build).mkdir(parents=True)
    for src, name in ((kernel, RAMDISK_KERNEL), (initrd, RAMDISK_INITRD)):
        for dst in (boot / name, boot / build / name):
            try:
                os.link(src, dst)
            except OSError:  # another filesystem
                shutil.copyfile(src, dst)
    (boot / "ramdisk.json").write_text(json.dumps({"build": build}) + "\n")


@dataclass(frozen=True)
class Netboot:
    vm: Vm
    requests: Requests


@contextmanager
def netboot(
    tmp_path: Path,
    boot: Path,
    firmware: Literal["bios", "uefi"],
    on_script: Callable[[], None] | None = None,
) -> Iterator[Netboot]:
    """`bootenv serve --boot BOOT` on 127.0.0.1 with MAC assigned, and a VM that netboots
    from it; both stopped on exit."""
    requests = Requests(on_script)
    served = logging.getLogger(httpconn.__name__)  # where each request is logged
    level = served.level
    served.addHandler(requests)
    served.setLevel(logging.DEBUG)
    images = tmp_path / "images"
    images.mkdir()
    port = free_port()
    url = f"http://{GUEST_HOST}:{port}"
    config = ServeConfig(images=images, state=tmp_path / "state", port=port, boot=boot, public_url=url)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "boot.ipxe").write_text(EMBED.read_text().replace(EMBED_URL, url))
    uefi_vars: Path | None = None
    if firmware == "uefi":
        uefi_vars = tmp_path / "OVMF_VARS.fd"
        shutil.copyfile(ovmf_code()[1], uefi_vars)
    # Under SeaBIOS, iPXE's text reaches the console log through SeaBIOS's serial
    # console, which bootenv/qemu.py turns on.
    spec = VmSpec(
        console_log=tmp_path / "console.log",
        firmware=firmware,
        netboot=True,
        tftp_dir=tftp,
        bootfile="boot.ipxe",
        mac=MAC,
        uefi_vars=uefi_vars,
    )
    try:
        with running(config) as srv:
            # The image is never fetched: no agent gets that far.
            srv.store.put(assign(MAC, f"http://{GUEST_HOST}:9/lamp", "all", now=time.time()))
            # The request log is what the test reads: if it moved (another logger), say
            # so now, not after a VM's timeout.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ipxe/boot.ipxe", timeout=10) as answer:
                answer.read()
            assert ("/ipxe/boot.ipxe", 200) in requests.seen, (
                "serve's request log is not where the test reads it"
            )
            with Vm(spec) as vm:
                yield Netboot(vm, requests)
    finally:
        served.removeHandler(requests)
        served.setLevel(level)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_load_that_keeps_failing_fetches_the_script_again_then_gives_up(
    tmp_path: Path, ramdisk: Ramdisk, firmware: Literal["bios", "uefi"]
) -> None:
    # A build whose kernel is not one: a megabyte of text, which no image type of iPXE's
    # takes (a PXE image must fit under 640 KiB).
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a kernel\n" * 50_000)
    boot = tmp_path / "boot"
    export(boot, OLD, junk, ramdisk.initramfs)
    with netboot(tmp_path, boot, firmware) as it:
        it.vm.wait_for(f"{re.escape(GAVE_UP)}|(?s:(?:{TRY}.*?){{4}})", TIMEOUT)
        console = it.vm.console()
        time.sleep(2)  # a fourth script, if one came, would be asked for at once
        answers = it.requests.paths()
    # Each failed load fetched the script again, which carried the count on: three
    # scripts, three kernels, then it gave up, with no fourth script and no initramfs.
    kernel = f"/boot/{OLD}/{RAMDISK_KERNEL}"
    assert answers == [("/ipxe/machine", 200), (kernel, 200)] * 3, answers
    assert console.count(TRY) == 3 and console.count(RETRYING) == 2, console
    # The message follows `clear bootenv-loads`: a command that fails ends an iPXE script.
    assert f"{GAVE_UP}; check http://{GUEST_HOST}:" in console, console


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_build_gone_before_its_fetch_is_a_404_and_the_script_fetched_again_boots_the_current_one(
    tmp_path: Path, ramdisk: Ramdisk, firmware: Literal["bios", "uefi"]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in (RAMDISK_KERNEL, RAMDISK_INITRD):
        (old / name).write_bytes(b"an older build, never fetched\n")
    boot = tmp_path / "boot"
    export(boot, OLD, old / RAMDISK_KERNEL, old / RAMDISK_INITRD)

    def two_builds_later() -> None:
        export(boot, "c2" * 8, old / RAMDISK_KERNEL, old / RAMDISK_INITRD)
        export(boot, NEW, ramdisk.vmlinuz, ramdisk.initramfs, keep="c2" * 8)

    with netboot(tmp_path, boot, firmware, on_script=two_builds_later) as it:
        # The current build's kernel runs: iPXE loaded both of its files and booted.
        it.vm.wait_for(f"Linux version|{re.escape(GAVE_UP)}", TIMEOUT)
        console = it.vm.console()
        answers = it.requests.paths()
    assert answers == [
        ("/ipxe/machine", 200),
        (f"/boot/{OLD}/{RAMDISK_KERNEL}", 404),
        ("/ipxe/machine", 200),
        (f"/boot/{NEW}/{RAMDISK_KERNEL}", 200),
        (f"/boot/{NEW}/{RAMDISK_INITRD}", 200),
    ], answers
    assert console.count(TRY) == 2 and console.count(RETRYING) == 1, console
    assert GAVE_UP not in console
