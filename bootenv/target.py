"""Post-write configuration of the target: its filesystem, identity and first boot.

The text of every file we write is built by a pure function (fstab, hosts, the
layout hand-off, the units), and the `configure` step only places them. The order
matters: the root filesystem gets its new UUID and is grown *before* it is mounted
(tune2fs -U rewrites the metadata checksums only on an unmounted filesystem, and
both tools want a freshly checked one). Every path in the mounted target is resolved
inside it (intree.in_target), as the installed system will resolve it: the gold's
absolute symlinks never lead the agent into the ramdisk.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootenv.bootloader import BIOS, EFI, GRUB_CFG, GRUB_DIR
from bootenv.intree import Mode, Readlink, in_target, inside, usable
from bootenv.run import run, which
from bootenv.runtime import RUNTIME, python_argv, unit_environment

log = logging.getLogger(__name__)

LAYOUT_JSON = "/etc/bootenv/layout.json"
LAYOUT_UNIT = "bootenv-layout.service"
# The first-boot layout tries a failure that may pass (the image server down for a while,
# a stream killed) again this many times, waiting 8.7 minutes in all (layout.RETRY_WAITS),
# before the machine is reported failed; a reboot then runs it again.
FIRST_BOOT_RETRIES = 5
# The first-boot layout's own deadline, in seconds: under the unit's TimeoutStartSec (2 h),
# so that the layout reports running out of time itself, where the unit's timeout would
# kill it unheard.
FIRST_BOOT_DEADLINE = 115 * 60
SSH_UNIT = "bootenv-ssh-keygen.service"
UNIT_DIR = "/etc/systemd/system"
WANTS = f"{UNIT_DIR}/multi-user.target.wants"
ESP_MOUNT = "/boot/efi"
SSH_DIR = "/etc/ssh"
ROOT_SSH = "/root/.ssh"
AUTHORIZED_KEYS = f"{ROOT_SSH}/authorized_keys"
FILES = ("/etc/fstab", "/etc/hostname", "/etc/hosts", "/etc/machine-id")  # replaced
# The gold's machine identity, removed if it is a file (capture leaves them out too).
STALE = ("/var/lib/dbus/machine-id", "/var/lib/systemd/random-seed")


@dataclass(frozen=True)
class Identity:
    root_uuid: str  # the root filesystem's new UUID
    esp_id: str  # the ESP's vfat volume id, as 8 hex digits (fstab writes XXXX-XXXX)
    hostname: str

    @property
    def esp_uuid(self) -> str:
        return f"{self.esp_id[:4]}-{self.esp_id[4:]}".upper()


@dataclass(frozen=True)
class LayoutHandoff:
    image: str
    components: tuple[str, ...]
    callback: str | None
    hostname: str
    insecure: bool = False
    trust: str | None = None


def new_identity(hostname: str | None) -> Identity:
    """Fresh UUIDs for this machine; the host name defaults to one derived from them."""
    root = str(uuid.uuid4())
    return Identity(root, secrets.token_hex(4), hostname or f"bootenv-{root[:8]}")


def fstab_text(ident: Identity) -> str:
    return (
        "# Written by bootenv at provisioning time: filesystems by UUID.\n"
        "# <file system>  <mount point>  <type>  <options>  <dump>  <pass>\n"
        f"UUID={ident.root_uuid}  /  ext4  errors=remount-ro  0  1\n"
        # nofail: a damaged ESP must not keep a BIOS-booted machine from coming up.
        f"UUID={ident.esp_uuid}  {ESP_MOUNT}  vfat  umask=0077,nofail  0  2\n"
    )


def hosts_text(old: str, hostname: str) -> str:
    """/etc/hosts with the image's 127.0.1.1 line replaced by this machine's name."""
    short = hostname.split(".", maxsplit=1)[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    lines = [line for line in old.splitlines() if not line.startswith("127.0.1.1")]
    if not any(line.split()[:1] == ["127.0.0.1"] for line in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    idx = next((i + 1 for i, line in enumerate(lines) if line.startswith("127.0.0.1")), 0)
    lines.insert(idx, f"127.0.1.1\t{names}")
    return "\n".join(lines) + "\n"


def layout_json(handoff: LayoutHandoff) -> str:
    body = {
        "version": 1,
        "image": handoff.image,
        "components": list(handoff.components),
        "callback": handoff.callback,
        "hostname": handoff.hostname,
        "insecure": handoff.insecure,
        "trust": handoff.trust,
    }
    return json.dumps(body, indent=2) + "\n"


# Runs after the layout succeeded: the hand-off is kept for the record, the unit is
# disabled, and bootenv's runtime (which the gold machine never had) is removed; then
# synced: a power cut in the next seconds ran the whole layout again at the next boot.
_CLEANUP = (
    "import os, shutil; "
    f"os.replace('{LAYOUT_JSON}', '{LAYOUT_JSON}.done'); "
    f"os.unlink('{WANTS}/{LAYOUT_UNIT}'); "
    f"shutil.rmtree('{RUNTIME}'); "
    "os.sync()"
)


def provisioned(root: Path) -> bool:
    """Whether bootenv provisioned the system at `root`: the agent left it the first-boot
    hand-off, renamed once the first layout was done."""
    return inside(root, LAYOUT_JSON).exists() or inside(root, f"{LAYOUT_JSON}.done").exists()


def layout_argv(handoff: LayoutHandoff) -> list[str]:
    """The `bootenv layout` command the unit runs, from the hand-off's settings."""
    argv = ["layout", "--image", handoff.image, "--components", ",".join(handoff.components) or "none"]
    argv += ["--root", "/", "--retries", str(FIRST_BOOT_RETRIES), "--deadline", str(FIRST_BOOT_DEADLINE)]
    if handoff.callback:
        argv += ["--callback", handoff.callback]
    if handoff.trust:
        argv += ["--fingerprint", handoff.trust]
    if handoff.insecure:
        argv.append("--insecure")
    return argv


def systemd_quote(word: str) -> str:
    """`word` as one word of an ExecStart= line, which systemd reads back as `word`: it
    expands % specifiers and $VARIABLES, undoes C escapes (in quotes or not) and splits
    at whitespace outside quotes (systemd.service(5), "Command lines")."""
    out = []
    for c in word:
        if c in '\\"':
            out.append("\\" + c)
        elif c in "%$":
            out.append(c + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    quoted = "".join(out)
    plain = word and all(c.isprintable() and not c.isspace() and c not in "\\\"';" for c in word)
    return quoted if plain else f'"{quoted}"'


def layout_unit_text(handoff: LayoutHandoff) -> str:
    py = " ".join(python_argv())
    args = " ".join(systemd_quote(a) for a in layout_argv(handoff))
    return (
        "# Written by bootenv: lays out the component sub-images on first boot, with\n"
        f"# bootenv's own Python runtime in {RUNTIME} (brought from the ramdisk, so it\n"
        "# does not depend on what the image has installed), then removes that runtime.\n"
        f"# The same settings are in {LAYOUT_JSON}.\n"
        "[Unit]\n"
        "Description=bootenv: lay out the component sub-images\n"
        "Wants=network-online.target\n"
        # After the host keys too: `done` means an admin can ssh in (a CI VM under TCG,
        # stopped at `done` after a layout of OS + MySQL, once had no host key yet).
        f"After=network-online.target local-fs.target {SSH_UNIT}\n"
        f"ConditionPathExists={LAYOUT_JSON}\n"
        f"ConditionPathExists={RUNTIME}/bin/python3\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"Environment={unit_environment()}\n"
        f"ExecStart={py} -m bootenv {args}\n"
        f'ExecStartPost={py} -c "{_CLEANUP}"\n'
        "TimeoutStartSec=2h\n"
        "StandardOutput=journal+console\n"
        "StandardError=journal+console\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def ssh_keygen_unit_text() -> str:
    return (
        "# Written by bootenv: every machine generates its own SSH host keys on first boot.\n"
        "[Unit]\n"
        "Description=bootenv: generate this machine's SSH host keys\n"
        "Before=ssh.service sshd.service\n"
        "ConditionFileIsExecutable=/usr/bin/ssh-keygen\n"
        "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "ExecStart=/usr/bin/ssh-keygen -A\n"
        # On the disk before anyone sees them: a power cut in the next seconds would
        # otherwise give the machine new keys at its next boot, unknown to its clients.
        "ExecStartPost=/usr/bin/sync -f /etc/ssh/ssh_host_ed25519_key\n"
        "RemainAfterExit=yes\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def prepare_root_fs(device: str, ident: Identity) -> None:
    """Check the written filesystem, give it its new UUID, and grow it to the partition."""
    # -p fixes only what is safe; exit code 1 means "errors corrected".
    proc = run([which("e2fsck"), "-f", "-p", device], check=False)
    if proc.returncode not in (0, 1):
        run([which("e2fsck"), "-f", "-n", device])  # raises with e2fsck's own message
    run([which("tune2fs"), "-U", ident.root_uuid, device])
    run([which("resize2fs"), device])


def make_esp(device: str, ident: Identity) -> None:
    run([which("mkfs.vfat"), "-F", "32", "-n", "EFI", "-i", ident.esp_id, device])


@contextmanager
def mounted(device: str, *, options: str = "") -> Iterator[Path]:
    """Mount `device` on a temporary directory for the duration of the block."""
    where = Path(tempfile.mkdtemp(prefix="bootenv-target-"))
    argv: list[str | Path] = [which("mount"), *(["-o", options] if options else []), device, where]
    try:
        run(argv)
        try:
            yield where
        finally:
            run([which("umount"), where])
    finally:
        where.rmdir()


def _read(root: Path, rel: str) -> str:
    """A file of the gold's, or "" if it has none. Its bytes need not be UTF-8 (a Latin-1
    comment in /etc/hosts): they are kept as surrogates, and `_write` gives them back."""
    path = in_target(root, rel)
    return path.read_bytes().decode("utf-8", "surrogateescape") if path.exists() else ""


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    """Replace the file (a symlink in its place too, never written through)."""
    path = in_target(root, rel, last=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.bootenv")
    tmp.write_bytes(text.encode("utf-8", "surrogateescape"))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _enable(root: Path, unit: str) -> None:
    link = in_target(root, f"{WANTS}/{unit}", last=False)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{UNIT_DIR}/{unit}")


def target_paths() -> tuple[tuple[str, bool], ...]:
    """Every path the agent reads, writes or removes in the target (configure, the
    runtime, the bootloader), with whether a symlink at its end is followed (a file
    read, a directory made) or replaced (see intree.in_target)."""
    units = (SSH_UNIT, LAYOUT_UNIT)
    written = (*FILES, *STALE, LAYOUT_JSON, AUTHORIZED_KEYS, RUNTIME, GRUB_CFG)
    return (
        *((path, False) for path in written),
        *((f"{d}/{unit}", False) for d in (UNIT_DIR, WANTS) for unit in units),
        *((path, True) for path in ("/etc/hosts", AUTHORIZED_KEYS, ESP_MOUNT, SSH_DIR, ROOT_SSH)),
        *((f"{GRUB_DIR}/{platform}", True) for platform in (BIOS, EFI)),
    )


def check_target(root: Path) -> None:
    """Refuse a target one of whose paths cannot be resolved inside it (a symlink loop,
    a link through a file), before anything is written into it: the manifest does not
    list the image's tree, so it is known here only once it is on the disk. Capture
    refuses such an image before it is made (check_tree)."""
    for path, last in target_paths():
        in_target(root, path, last=last)


def check_tree(readlink: Readlink, mode_of: Mode) -> None:
    """check_target of an image's tree not yet made: its links read by `readlink`, its
    entries' modes by `mode_of` (capture's, from the gold's scan)."""
    for path, last in target_paths():
        usable(path, readlink, mode_of, last=last)


def configure(root: Path, ident: Identity, handoff: LayoutHandoff, ssh_key: str | None) -> None:
    """Give the mounted target its own identity and its first-boot work."""
    check_target(root)
    _write(root, "/etc/fstab", fstab_text(ident))
    in_target(root, ESP_MOUNT).mkdir(parents=True, exist_ok=True)
    _write(root, "/etc/hostname", ident.hostname + "\n")
    _write(root, "/etc/hosts", hosts_text(_read(root, "/etc/hosts"), ident.hostname))
    # An empty machine-id makes systemd generate a fresh one on first boot.
    _write(root, "/etc/machine-id", "", 0o444)
    for stale in STALE:
        p = in_target(root, stale, last=False)
        if p.is_file() and not p.is_symlink():
            p.unlink()
    for key in in_target(root, SSH_DIR).glob("ssh_host_*"):
        key.unlink()
    _write(root, f"{UNIT_DIR}/{SSH_UNIT}", ssh_keygen_unit_text())
    _enable(root, SSH_UNIT)
    if ssh_key:
        _authorize(root, ssh_key)
    _write(root, LAYOUT_JSON, layout_json(handoff), 0o600)
    _write(root, f"{UNIT_DIR}/{LAYOUT_UNIT}", layout_unit_text(handoff))
    _enable(root, LAYOUT_UNIT)


def _authorize(root: Path, key: str) -> None:
    ssh = in_target(root, ROOT_SSH)
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ssh, 0o700)
    old = _read(root, AUTHORIZED_KEYS)
    if key not in old.splitlines():
        _write(
            root,
            AUTHORIZED_KEYS,
            old + ("" if not old or old.endswith("\n") else "\n") + key + "\n",
            0o600,
        )
