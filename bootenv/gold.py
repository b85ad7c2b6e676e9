"""Build the reference LAMP "gold machine" tree used by the demo, tests and benchmarks.

This is a development fixture, not part of provisioning: a debootstrapped Debian
bookworm with a tuned LAMP stack, cached under ~/.cache/bootenv by its inputs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bootenv.cache import cache_root, input_key, locked
from bootenv.errors import UserError
from bootenv.log import step
from bootenv.run import run, which

log = logging.getLogger(__name__)

BUILDER_VERSION = 3

GOLD_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "linux-image-amd64",
    "apache2",
    "mariadb-server",
    "php",
    "libapache2-mod-php",
    "php-mysql",
    "openssh-server",
    "e2fsprogs",
    "curl",
)

# What the admin "tuned" on the gold machine: files no package owns.
GOLD_EXTRAS = {
    "var/www/html/info.php": "<?php echo 'bootenv gold ' . PHP_VERSION . \"\\n\"; ?>\n",
    # Listen on all addresses so the demo can check MariaDB answers through QEMU's hostfwd.
    "etc/mysql/mariadb.conf.d/60-bootenv-gold.cnf": (
        "[mysqld]\nmax_connections = 64\nbind-address = 0.0.0.0\n"
    ),
    "etc/systemd/network/10-dhcp.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    "etc/hostname": "gold\n",
}


@dataclass(frozen=True)
class GoldSpec:
    suite: str = "bookworm"
    mirror: str = ""
    packages: tuple[str, ...] = GOLD_PACKAGES


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (BOOTENV_MIRROR overrides it)."""
    env = os.environ.get("BOOTENV_MIRROR")
    if env:
        return env
    candidates: list[Path] = sorted((sources_dir / "sources.list.d").glob("*.sources"))
    candidates += [sources_dir / "sources.list"]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1)
    raise UserError("cannot find a Debian mirror in /etc/apt", hint="set BOOTENV_MIRROR")


def gold_tree(spec: GoldSpec | None = None) -> Path:
    """Return the cached gold tree, building it with debootstrap if needed (root only)."""
    spec = spec or GoldSpec(mirror=apt_mirror())
    key = input_key({"v": BUILDER_VERSION, "suite": spec.suite, "pkgs": spec.packages, "extras": GOLD_EXTRAS})
    with locked(f"gold-{key}"):
        return _build(spec, key)


def _build(spec: GoldSpec, key: str) -> Path:
    root = cache_root()
    tree = root / f"gold-{spec.suite}-{key}"
    done = root / f"{tree.name}.complete"
    if done.exists() and tree.is_dir():
        log.info("Reusing cached gold tree %s", tree)
        return tree
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    tmp = tree.with_name(tree.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with step(f"Building gold machine {tree.name} with debootstrap"):
        run(
            [
                which("debootstrap"),
                "--variant=minbase",
                f"--include={','.join(spec.packages)}",
                f"--cache-dir={debs}",
                spec.suite,
                tmp,
                spec.mirror,
            ],
            timeout=3600,
        )
    for rel, text in GOLD_EXTRAS.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # Let the serial console log in as root without a password (a test fixture).
    run(["chroot", tmp, "passwd", "-d", "root"])
    run(["chroot", tmp, "systemctl", "enable", "systemd-networkd", "serial-getty@ttyS0"])
    if tree.exists():
        shutil.rmtree(tree)
    tmp.rename(tree)
    done.write_text(spec.suite + "\n")
    return tree
