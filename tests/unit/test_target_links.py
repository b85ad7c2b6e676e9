"""The agent's reads, writes and removals in the mounted target resolve the gold's
symlinks inside the target, as the booted system will: an absolute link (/opt ->
/srv/opt) never leads into the ramdisk. Every link here points at OUTSIDE, a directory
next to the root that stands for the ramdisk's own tree: it must be left as it was, and
what the agent writes lands in ROOT/OUTSIDE, where the booted system finds it."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest

from bootenv import bootloader, handoff
from bootenv.errors import FatalError, UserError
from bootenv.intree import in_target, inside
from bootenv.runtime import RUNTIME, _copy_ca_bundle, install_runtime
from bootenv.target import LAYOUT_UNIT, SSH_UNIT, Identity, LayoutHandoff, check_target, configure

IDENT = Identity("0b0e9a55-1f2c-4d6e-8a9b-c0d1e2f3a4b5", "1a2b3c4d", "web1.example.org")
HANDOFF = LayoutHandoff("http://10.0.2.2:8080/lamp", ("apache",), None, "web1.example.org")
KEY = "ssh-ed25519 AAAA me@host"


def tree(top: Path) -> dict[str, bytes | str | None]:
    """Every entry under `top`: a file's bytes, a symlink's target, None for a directory."""
    out: dict[str, bytes | str | None] = {}
    for p in sorted(top.rglob("*")):
        rel = str(p.relative_to(top))
        out[rel] = str(p.readlink()) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """The ramdisk's tree, as the links' absolute targets name it: files the agent must not touch."""
    out = tmp_path / "outside"
    for rel, text in {
        "ssh/ssh_host_rsa_key": "the ramdisk's host key",
        "var/lib/systemd/random-seed": "the ramdisk's seed",
        "var/lib/dbus/machine-id": "the ramdisk's id",
        "home/root/.ssh/authorized_keys": "the ramdisk's key\n",
        "boot/grub/grub.cfg": "the ramdisk's menu",
    }.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    (out / "opt").mkdir()
    return out


def link(root: Path, rel: str, target: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).symlink_to(target)


def in_gold(root: Path, outside: Path, rel: str) -> Path:
    """ROOT/OUTSIDE/`rel`: where a link to OUTSIDE/`rel` leads on the booted system."""
    return root / str(outside).lstrip("/") / rel


def test_configure_writes_and_removes_where_the_golds_absolute_links_lead_inside_it(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    link(root, "etc/ssh", f"{outside}/ssh")  # exists on the "ramdisk"
    link(root, "root", f"{outside}/home/root")
    link(root, "etc/systemd", f"{outside}/systemd")  # does not: made inside the root
    link(root, "etc/bootenv", f"{outside}/bootenv")
    gold_ssh = in_gold(root, outside, "ssh")
    gold_ssh.mkdir(parents=True)
    (gold_ssh / "ssh_host_rsa_key").write_text("the gold's host key")
    (gold_ssh / "sshd_config").write_text("PermitRootLogin prohibit-password\n")
    before = tree(outside)
    configure(root, IDENT, HANDOFF, KEY)
    assert tree(outside) == before
    assert sorted(p.name for p in gold_ssh.iterdir()) == ["sshd_config"]
    keys = in_gold(root, outside, "home/root/.ssh/authorized_keys")
    assert keys.read_text() == KEY + "\n" and keys.stat().st_mode & 0o777 == 0o600
    units = in_gold(root, outside, "systemd/system")
    assert (units / LAYOUT_UNIT).is_file() and (units / SSH_UNIT).is_file()
    wants = units / "multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == [LAYOUT_UNIT, SSH_UNIT]
    assert '"image": "http://10.0.2.2:8080/lamp"' in in_gold(root, outside, "bootenv/layout.json").read_text()
    # The gold's links stay: its system finds the files through them.
    assert (root / "etc/ssh").readlink() == Path(f"{outside}/ssh")


def test_the_random_seed_under_a_linked_var_is_removed(tmp_path: Path, outside: Path) -> None:
    """A gold whose /var links elsewhere kept its random seed and D-Bus machine id on
    every machine provisioned from it (and the ramdisk's were removed, if it had any)."""
    root = tmp_path / "root"
    link(root, "var", f"{outside}/var")
    gold_var = in_gold(root, outside, "var/lib")
    for rel in ("systemd/random-seed", "dbus/machine-id"):
        (gold_var / rel).parent.mkdir(parents=True)
        (gold_var / rel).write_text("the gold's")
    before = tree(outside)
    configure(root, IDENT, HANDOFF, None)
    assert tree(outside) == before
    assert not (gold_var / "systemd/random-seed").exists()
    assert not (gold_var / "dbus/machine-id").exists()
    assert (gold_var / "systemd").is_dir()


@pytest.mark.parametrize("there", ["opt", "missing/opt"], ids=["link-to-a-dir", "dangling-link"])
def test_the_runtime_goes_where_the_golds_opt_leads(
    tmp_path: Path, outside: Path, there: str, allow_run: None
) -> None:
    """`opt -> /srv/opt` ended the agent in FileExistsError on a written disk; with a link
    to a directory the ramdisk has, the runtime went there, and the first boot, not
    finding /opt/bootenv/bin/python3, skipped the layout without a word."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "opt").symlink_to(f"{outside}/{there}")
    before = tree(outside)
    dest = install_runtime(root)
    assert tree(outside) == before
    assert dest == in_gold(root, outside, f"{there}/bootenv")
    # The layout unit's ConditionPathExists, as the booted system resolves it.
    assert inside(root, f"{RUNTIME}/bin/python3").is_file()
    assert (dest / "lib/ld-linux-x86-64.so.2").is_file()
    install_runtime(root)  # again: the old copy is replaced where it is
    assert tree(outside) == before


def test_a_symlink_loop_is_refused_before_anything_is_written(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    link(root, "etc", f"{outside}/loop")
    link(root, str(outside / "loop").lstrip("/"), "/etc")
    (root / "etc-keep").write_text("x")
    before, before_root = tree(outside), tree(root)
    with pytest.raises(UserError) as err:
        configure(root, IDENT, HANDOFF, KEY)
    assert str(err.value).startswith(
        "the OS image's /etc/fstab cannot be resolved inside it: a symlink loop at "
    )
    assert "\n" not in str(err.value)
    assert tree(outside) == before and tree(root) == before_root


def test_the_golds_ca_bundle_is_read_where_its_links_lead(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ramdisk without CA certificates brings the target's own: the gold's, not the
    ramdisk's file of that name."""
    monkeypatch.setattr(certifi, "where", lambda: str(tmp_path / "no-bundle.pem"))
    root = tmp_path / "root"
    link(root, "etc/ssl", f"{outside}/ssl")
    for top, whose in ((outside, "the ramdisk's"), (in_gold(root, outside, ""), "the gold's")):
        (top / "ssl/certs").mkdir(parents=True)
        (top / "ssl/certs/ca-certificates.crt").write_text(f"{whose} bundle")
    _copy_ca_bundle(root, tmp_path / "bundle.crt")
    assert (tmp_path / "bundle.crt").read_text() == "the gold's bundle"


def test_grub_files_go_where_the_golds_boot_leads(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grub_lib = tmp_path / "grub-lib"  # the ramdisk's grub files, wherever it has them
    for platform in (bootloader.BIOS, bootloader.EFI):
        (grub_lib / platform).mkdir(parents=True)
        (grub_lib / platform / "normal.mod").write_bytes(b"module")
    monkeypatch.setattr(bootloader, "GRUB_LIB", grub_lib)
    root = tmp_path / "root"
    link(root, "boot", f"{outside}/boot")
    gold_grub = in_gold(root, outside, "boot/grub")
    gold_grub.mkdir(parents=True)
    (gold_grub / "grub.cfg").symlink_to("grub.cfg.gold")  # replaced, not written through
    before = tree(outside)
    bootloader.copy_modules(root)
    bootloader.write_config(root, "menuentry 'x' {}\n")
    assert tree(outside) == before
    assert (gold_grub / "grub.cfg").read_text() == "menuentry 'x' {}\n"
    assert not (gold_grub / "grub.cfg").is_symlink() and not (gold_grub / "grub.cfg.gold").exists()
    for platform in (bootloader.BIOS, bootloader.EFI):
        assert (gold_grub / platform / "normal.mod").is_file()


def test_the_kernel_is_found_where_the_golds_boot_leads(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    link(root, "boot", f"{outside}/boot")
    (outside / "boot/vmlinuz-9.9.9-amd64").write_text("the ramdisk's kernel")
    gold_boot = in_gold(root, outside, "boot")
    gold_boot.mkdir(parents=True)
    (gold_boot / "vmlinuz-6.1.0-50-amd64").write_text("the gold's kernel")
    (gold_boot / "initrd.img-6.1.0-50-amd64").symlink_to(f"{outside}/boot/initrd.img")
    (gold_boot / "initrd.img").write_text("the gold's initrd")
    spec = handoff.kexec_spec(root, IDENT.root_uuid)
    assert spec.kernel == gold_boot / "vmlinuz-6.1.0-50-amd64"
    assert spec.initrd == gold_boot / "initrd.img"


def test_a_boot_that_is_a_symlink_loop_has_no_kernel(tmp_path: Path) -> None:
    root = tmp_path / "root"
    link(root, "boot", "/boot2")
    link(root, "boot2", "/boot")
    with pytest.raises(FatalError, match="no kernel in /boot"):
        handoff.find_kernel(root)


def test_a_link_through_a_file_is_refused_before_anything_is_written(tmp_path: Path, outside: Path) -> None:
    """The runtime's directory cannot be made under /etc/hostname: the check that runs
    before configure's first write finds it, not the runtime step after it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("gold\n")
    link(root, "opt", "/etc/hostname/opt")
    before_root = tree(root)
    with pytest.raises(UserError) as err:
        configure(root, IDENT, HANDOFF, None)
    assert str(err.value).startswith("the OS image's /opt/bootenv cannot be resolved inside it: ")
    assert "it leads to /etc/hostname/opt/bootenv, and /etc/hostname is not a directory" in str(err.value)
    assert tree(root) == before_root


def test_a_target_whose_links_all_resolve_passes_the_check(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    for rel in ("opt", "var", "etc/ssh", "boot", "root"):
        link(root, rel, f"{outside}/{rel}")
    check_target(root)
    assert in_target(root, "/opt/bootenv", last=False) == in_gold(root, outside, "opt/bootenv")
    assert in_target(root, "/") == root
