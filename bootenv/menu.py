"""iPXE scripts, generated from frozen inputs: pure functions, text out.

- `entry_script`: what every iPXE client fetches first; it chains to its own script.
- `menu_script`: the datacenter menu for machines nobody assigned.
- `provision_script`: boots the ramdisk with the agent's kernel arguments, no key press.
- `local_script`: boots from the local disk, so a provisioned machine never reinstalls.
- `message_script`: says why nothing happens (failed, unknown image), then boots locally.

Every value that goes into a script was validated upstream (MACs, image names, catalog
titles and kernel arguments, by bootenv/ipxetext.py's rules); `_safe` checks again, and
free text (why a machine failed, why nothing boots) is scrubbed, since iPXE expands
`${...}` anywhere in a line and splits commands at `;`, `||` and `&&`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from bootenv import ipxetext
from bootenv.catalog import LOCAL, Catalog

# The booting NIC's MAC, expanded by iPXE. `netX` is iPXE's name for the network device
# opened last (find_netdev, src/net/netdevice.c), the one whose DHCP answer led here;
# `net0` is the first NIC, whatever port the machine booted from. An unscoped `${mac}`
# follows netX too, but only while no other scope sets `mac`: netX says so outright.
MAC_VAR = "${netX/mac}"
RAMDISK_KERNEL = "vmlinuz"
RAMDISK_INITRD = "initramfs.img"
CONSOLE = "console=tty0 console=ttyS0,115200n8"
# x86's COMMAND_LINE_SIZE is 2048 with the NUL: the kernel keeps the first 2047 bytes and
# drops the rest without a word, a bootenv.hostname= or the kernel arguments with it.
MAX_CMDLINE = 2047


@dataclass(frozen=True)
class BootSpec:
    """Everything the ramdisk's kernel command line carries for one machine."""

    base_url: str  # where iPXE reaches bootenv serve, e.g. http://10.0.2.2:8080
    mac: str
    image_url: str
    components: str  # "all", "none" or "a,b"
    hostname: str | None = None
    kernel_args: str = ""
    boot_url: str | None = None  # where vmlinuz and initramfs.img are; default BASE/boot
    assignment: str | None = None  # the assignment's id: its run's events name it
    build: str | None = None  # the ramdisk build the URLs name (BOOT/ID/vmlinuz: bootfiles)

    @property
    def callback_url(self) -> str:
        """Where the agent, and the layout service after it, post their events: with the
        assignment's id, so that serve tells a replaced run's events from the new one's."""
        url = f"{self.base_url}/callback/{self.mac}"
        return f"{url}/{self.assignment}" if self.assignment else url

    def kernel_cmdline(self) -> str:
        # initrd= names the initrd for the kernel's EFI stub: without it a UEFI boot
        # through iPXE's `kernel`/`initrd` starts with no initramfs at all.
        args = [
            f"initrd={RAMDISK_INITRD}",
            CONSOLE,
            f"bootenv.image={self.image_url}",
            f"bootenv.components={self.components}",
            f"bootenv.callback={self.callback_url}",
            # The NIC the machine booted from, which the ramdisk's init tries first
            # (pxelinux's and dracut's form: 01, Ethernet, then the MAC with dashes).
            f"BOOTIF=01-{self.mac.replace(':', '-')}",
        ]
        if self.hostname:
            args.append(f"bootenv.hostname={self.hostname}")
        if self.kernel_args:
            args.append(self.kernel_args)
        return " ".join(args)


def cmdline_problem(spec: BootSpec) -> str | None:
    """Why `spec`'s kernel command line cannot go to the ramdisk (None if it can)."""
    size = len(spec.kernel_cmdline().encode())
    if size <= MAX_CMDLINE:
        return None
    return (
        f"the ramdisk's kernel command line would be {size} bytes, over the {MAX_CMDLINE} "
        "the kernel keeps (it drops the rest): shorten the image URL, the host name or the kernel arguments"
    )


def _safe(text: str) -> str:
    why = ipxetext.problem(text)
    if why is not None:
        raise ValueError(f"refusing to put {text!r} into an iPXE script: it {why}")
    return text


def entry_script(base_url: str) -> str:
    """`/ipxe/boot.ipxe`: chain to this machine's own script, retrying a flaky network."""
    base = _safe(base_url)
    return f"""#!ipxe
# bootenv entry script: every client asks for its own script by MAC address.
set bootenv-tries:int32 0
:retry
chain --autofree {base}/ipxe/machine?mac={MAC_VAR} && exit ||
isset ${{bootenv-local}} && exit 1 ||
inc bootenv-tries
iseq ${{bootenv-tries}} 5 && goto give_up ||
echo bootenv: cannot reach {base}, retrying in 5 s
sleep 5
goto retry
:give_up
echo bootenv: {base} does not answer; booting from local disk
{_local_lines()}"""


def _local_lines() -> str:
    # Under UEFI `sanboot --drive 0x80` is unreliable; `exit 1` hands control back to
    # the firmware, which boots the next entry of its boot order: the disk.
    # `bootenv-local` tells the entry script that this `exit 1` is on purpose, not a
    # network failure to retry.
    return (
        "set bootenv-local 1\n"
        "iseq ${platform} efi && exit 1 ||\n"
        "sanboot --no-describe --drive 0x80 || exit 1\n"
    )


def local_script(mac: str, reason: str) -> str:
    return f"""#!ipxe
# bootenv: {_safe(mac)} boots from its local disk
echo bootenv: {ipxetext.scrub(reason)}, booting from local disk
{_local_lines()}"""


def message_script(mac: str, message: str, *, wait: int = 10) -> str:
    """Show a problem on the console for `wait` seconds, then boot from local disk."""
    return f"""#!ipxe
# bootenv: {_safe(mac)}
echo bootenv: {ipxetext.scrub(message)}
sleep {int(wait)}
{_local_lines()}"""


def provision_script(spec: BootSpec) -> str:
    """Boot the ramdisk for `spec`, with no key press.

    A failed load fetches this machine's script again (`chain --replace`: it ends this
    one) rather than the same URLs: the build they name may be gone (a 404, two
    build-ramdisk -o since), and the new script names the current one. The count of
    tries, `bootenv-loads`, carries over to it; it goes back to the same URLs only if
    the script cannot be fetched.

    A command line the kernel would cut (`cmdline_problem`) is not sent: the machine is
    told why and boots from its disk. An assignment that long was refused already
    (machines.check_boot_args); this is the last line of defence.
    """
    too_long = cmdline_problem(spec)
    if too_long is not None:
        return message_script(spec.mac, too_long, wait=30)
    boot = _safe(spec.boot_url or f"{spec.base_url}/boot")
    files = f"{boot}/{_safe(spec.build)}" if spec.build else boot
    cmdline = _safe(spec.kernel_cmdline())
    what = spec.components if spec.components not in ("all", "none") else f"{spec.components} components"
    return f"""#!ipxe
# bootenv: provision {_safe(spec.mac)}
echo bootenv: installing {_safe(spec.image_url)} ({_safe(what)}) on {_safe(spec.mac)}
imgfree
isset ${{bootenv-loads}} || set bootenv-loads:int32 0
:retry
kernel {files}/{RAMDISK_KERNEL} {cmdline} || goto failed
initrd --name {RAMDISK_INITRD} {files}/{RAMDISK_INITRD} || goto failed
boot || goto failed
:failed
imgfree
inc bootenv-loads
iseq ${{bootenv-loads}} 3 && goto give_up ||
echo bootenv: could not load the ramdisk, retrying in 5 s
sleep 5
chain --replace --autofree {_safe(spec.base_url)}/ipxe/machine?mac={_safe(spec.mac)} ||
goto retry
:give_up
clear bootenv-loads
echo bootenv: the ramdisk did not load; check {files}/ answers
prompt --timeout 60000 Press a key for the iPXE shell || reboot
shell
"""


def menu_script(catalog: Catalog, base_url: str, *, mac: str | None = None) -> str:
    """The boot menu: one item per catalog entry, local disk, and the iPXE shell.

    Choosing an entry chains to `/ipxe/select/<entry>?mac=...`, which records the
    choice as the machine's assignment, so that once provisioned it boots locally.
    """
    base = _safe(base_url)
    who = _safe(mac) if mac else MAC_VAR
    lines = [
        "#!ipxe",
        "# bootenv menu, generated from the catalog",
        ":menu",
        # `--` ends iPXE's options (src/core/getopt.c): a title such as `--- rack 4 ---`
        # would be read as one, and the failed `menu` would end the script.
        f"menu -- {_safe(catalog.title)} ({who})",
    ]
    if catalog.entries:
        lines.append("item --gap Install")
    for i, e in enumerate(catalog.entries):
        lines.append(f"item e{i} {_safe(e.title)}")
    lines += [
        "item --gap Other",
        f"item {LOCAL} Boot from local disk",
        "item shell iPXE shell",
    ]
    default = LOCAL
    for i, e in enumerate(catalog.entries):
        if e.id == catalog.default:
            default = f"e{i}"
    timeout_ms = round(catalog.timeout * 1000)
    lines.append(
        f"choose --default {default} --timeout {timeout_ms} target && goto ${{target}} || goto {LOCAL}"
    )
    for i, e in enumerate(catalog.entries):
        lines += [
            f":e{i}",
            f"chain {base}/ipxe/select/{quote(e.id)}?mac={who} || goto failed",
            "goto menu",
        ]
    lines += [
        f":{LOCAL}",
        _local_lines().rstrip("\n"),
        ":shell",
        "shell",
        "goto menu",
        ":failed",
        "echo bootenv: that entry did not boot",
        "prompt --timeout 10000 Press a key to return to the menu ||",
        "goto menu",
    ]
    return "\n".join(lines) + "\n"
