"""The pure half of the ramdisk builder: cache keys, module closure, trim rule, file plans."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootenv import bootfiles, ramdisk, ramdisk_export, writeback
from bootenv.errors import UserError
from bootenv.ramdisk import default_initramfs_dir
from bootenv.ramdisk_plan import (
    PYTHON_DIR,
    RamdiskInputs,
    base_key,
    cpio_list,
    drop_modules,
    drop_path,
    load_inputs,
    module_name,
    overlay_plan,
    package_sources,
    parse_list,
    parse_module_index,
    ramdisk_key,
    select_modules,
)

INPUTS = RamdiskInputs(
    suite="bookworm",
    packages=("python3", "udev"),
    modules=("ext4", "virtio_blk"),
    modules_load=("ext4",),
    init=b"#!/bin/sh\necho hi\n",
    udhcpc_script=b"#!/bin/sh\n",
    sources=(("bootenv/__init__.py", b""), ("bootenv/cli.py", b"x = 1\n")),
)


# --- inputs and cache keys ------------------------------------------------------------------


def test_keys_are_stable() -> None:
    same = dataclasses.replace(INPUTS, packages=tuple(INPUTS.packages))
    assert base_key(INPUTS) == base_key(same)
    assert ramdisk_key(INPUTS) == ramdisk_key(same)
    assert len(ramdisk_key(INPUTS)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"packages": ("python3", "udev", "busybox")},
        {"modules": ("ext4",)},
        {"suite": "trixie"},
    ],
)
def test_package_and_module_lists_change_both_keys(change: dict[str, object]) -> None:
    other = dataclasses.replace(INPUTS, **change)  # type: ignore[arg-type]
    assert base_key(other) != base_key(INPUTS)
    assert ramdisk_key(other) != ramdisk_key(INPUTS)


@pytest.mark.parametrize(
    "change",
    [
        {"init": b"#!/bin/sh\necho bye\n"},
        {"udhcpc_script": b"#!/bin/sh\nexit 0\n"},
        {"modules_load": ("ext4", "vfat")},
        {"sources": (("bootenv/__init__.py", b""), ("bootenv/cli.py", b"x = 2\n"))},
        {"sources": (("bootenv/__init__.py", b""),)},
        {"sources": (("bootenv/__init__.py", b""), ("bootenv/cli2.py", b"x = 1\n"))},
    ],
)
def test_init_and_sources_change_only_the_final_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(INPUTS, **change)  # type: ignore[arg-type]
    # The slow debootstrap stage is reused; only the small overlay is repacked.
    assert base_key(other) == base_key(INPUTS)
    assert ramdisk_key(other) != ramdisk_key(INPUTS)


def test_parse_list_drops_comments_and_blanks() -> None:
    assert parse_list("# head\npython3\n\n  udev  # the daemon\n#x\n") == ("python3", "udev")


def test_package_sources_skip_caches(tmp_path: Path) -> None:
    pkg = tmp_path / "bootenv"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text("y = 2\n")
    (pkg / "sub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "stale.pyc").write_bytes(b"\0")
    assert package_sources(pkg) == (("bootenv/__init__.py", b""), ("bootenv/sub/m.py", b"y = 2\n"))


def test_source_edit_changes_key(tmp_path: Path) -> None:
    pkg = tmp_path / "bootenv"
    pkg.mkdir()
    (pkg / "a.py").write_text("a = 1\n")
    first = dataclasses.replace(INPUTS, sources=package_sources(pkg))
    assert ramdisk_key(dataclasses.replace(INPUTS, sources=package_sources(pkg))) == ramdisk_key(first)
    (pkg / "a.py").write_text("a = 2\n")
    assert ramdisk_key(dataclasses.replace(INPUTS, sources=package_sources(pkg))) != ramdisk_key(first)


def test_repo_inputs_load() -> None:
    here = Path(__file__).resolve().parents[2]
    inputs = load_inputs(default_initramfs_dir(), here / "bootenv")
    assert {"python3", "python3-cffi-backend", "busybox", "linux-image-amd64"} <= set(inputs.packages)
    assert {"virtio_blk", "virtio_net", "nvme", "ahci", "ext4", "vfat"} <= set(inputs.modules)
    assert set(inputs.modules_load) <= set(inputs.modules)
    assert inputs.init.startswith(b"#!/bin/sh")
    assert any(name == "bootenv/cli.py" for name, _ in inputs.sources)


# What a server's disks hang off: without the driver, the disks behind it do not show.
STORAGE_DRIVERS = (
    "nvme",
    "ahci",
    "ata_piix",
    "sd_mod",
    "virtio_blk",
    "virtio_scsi",
    "megaraid_sas",  # Dell PERC, Broadcom/LSI MegaRAID
    "mpt3sas",  # Broadcom/LSI SAS HBAs (and PERC HBA330)
    "mpi3mr",  # Broadcom tri-mode HBAs and RAID (9600 series)
    "smartpqi",  # HPE Smart Array (Gen10 on), Microchip/Adaptec SmartRAID
    "hpsa",  # HPE Smart Array before Gen10
    "aacraid",  # Adaptec RAID
)
NIC_DRIVERS = ("virtio_net", "e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "bnxt_en", "mlx5_core", "tg3")


def test_the_ramdisk_carries_server_storage_and_nic_drivers() -> None:
    """_trim_modules deletes every module not in modules.txt (nor needed by one)."""
    inputs = load_inputs(default_initramfs_dir(), Path(__file__).resolve().parents[2] / "bootenv")
    assert set(STORAGE_DRIVERS + NIC_DRIVERS) <= set(inputs.modules)
    # The agent's offset loop devices need /dev/loop-control: loaded at boot, not on demand.
    assert "loop" in inputs.modules and "loop" in inputs.modules_load


def test_missing_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"packages\.txt"):
        load_inputs(tmp_path, tmp_path)


# --- module selection -----------------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/fs/nls/nls_iso8859-1.ko:
kernel/drivers/net/wireless/foo/foo.ko: kernel/net/wireless/cfg80211.ko
kernel/net/wireless/cfg80211.ko:
kernel/sound/snd.ko:
"""
SOFTDEP = """\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep jbd2 pre: crypto-crc32c
softdep snd post: snd-extra
"""
ALIAS = """\
alias crypto-crc32c crc32c_generic
alias crypto-crc32c crc32c_intel
alias pci:v00001AF4d00001001sv*sd*bc*sc*i* virtio_blk
"""
BUILTIN = "kernel/net/packet/af_packet.ko\nkernel/drivers/virtio/virtio_pci.ko\n"


def test_module_name_normalises() -> None:
    assert module_name("kernel/fs/nls/nls_iso8859-1.ko") == "nls_iso8859_1"
    assert module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz") == "crc32c_intel"
    assert module_name("a/b/ext4.ko.zst") == "ext4"


def test_closure_follows_deps_and_softdep_aliases() -> None:
    index = parse_module_index(MODULES_DEP, SOFTDEP, ALIAS, BUILTIN)
    sel = select_modules(index, ["ext4"])
    assert sel.keep == (
        "kernel/arch/x86/crypto/crc32c-intel.ko",
        "kernel/crypto/crc32c_generic.ko",
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
    )
    assert sel.missing == () and sel.builtin == ()


def test_dash_and_underscore_are_the_same_module() -> None:
    index = parse_module_index(MODULES_DEP, SOFTDEP, ALIAS, BUILTIN)
    assert select_modules(index, ["nls_iso8859-1"]).keep == ("kernel/fs/nls/nls_iso8859-1.ko",)
    assert select_modules(index, ["nls_iso8859_1"]).keep == ("kernel/fs/nls/nls_iso8859-1.ko",)


def test_builtin_and_missing_are_reported_not_kept() -> None:
    index = parse_module_index(MODULES_DEP, SOFTDEP, ALIAS, BUILTIN)
    sel = select_modules(index, ["af_packet", "virtio_pci", "ice", "virtio_blk"])
    assert sel.builtin == ("af_packet", "virtio_pci")
    assert sel.missing == ("ice",)
    assert sel.keep == (
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    )


def test_wildcard_aliases_never_pull_in_modules() -> None:
    index = parse_module_index(MODULES_DEP, SOFTDEP, ALIAS, BUILTIN)
    assert not any("*" in a for a in index.aliases)


def test_drop_modules_is_everything_not_kept() -> None:
    index = parse_module_index(MODULES_DEP, SOFTDEP, ALIAS, BUILTIN)
    sel = select_modules(index, ["virtio_blk"])
    dropped = drop_modules(index.deps.keys(), sel.keep)
    assert "kernel/sound/snd.ko" in dropped
    assert "kernel/net/wireless/cfg80211.ko" in dropped
    assert not set(dropped) & set(sel.keep)
    assert set(dropped) | set(sel.keep) == set(index.deps)


# --- trim rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "usr/share/doc/python3/copyright",
        "usr/share/man/man1/ls.1.gz",
        "usr/share/locale/de/LC_MESSAGES/coreutils.mo",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
        "var/cache/apt/pkgcache.bin",
        "boot/vmlinuz-6.1.0-50-amd64",
        "boot/initrd.img-6.1.0-50-amd64",
        "usr/lib/python3.11/test/test_os.py",
        "usr/lib/udev/hwdb.bin",
        "usr/lib/udev/hwdb.d/20-pci-vendor-model.hwdb",
        "usr/lib/grub/x86_64-efi/monolithic/grubnetx64.efi",
        "etc/ssl/openssl.cnf.dpkg-old",
        "usr/lib/modules/6.1.0-50-amd64/build",
    ],
)
def test_trim_drops(path: str) -> None:
    assert drop_path(path)


@pytest.mark.parametrize(
    "path",
    [
        # The directories themselves stay, empty: tools write there.
        "boot",
        "var/log",
        "var/cache/apt",
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        "usr/lib/python3/dist-packages/parted/__init__.py",
        "usr/lib/grub/i386-pc/boot.img",
        "usr/lib/grub/x86_64-efi/ext2.mod",
        "usr/lib/udev/rules.d/60-persistent-storage.rules",
        "usr/lib/modules/6.1.0-50-amd64/modules.dep",
        "usr/share/doc-base",  # a prefix of a dropped dir, but not inside it
        "etc/bootenv/modules",
    ],
)
def test_trim_keeps(path: str) -> None:
    assert not drop_path(path)


# --- archive plans --------------------------------------------------------------------------


def test_cpio_list_puts_parents_first(tmp_path: Path) -> None:
    for rel in ("a/b/c.txt", "a-b/d.txt", "a/z.txt", "top.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link").symlink_to("a/z.txt")
    (tmp_path / "empty").mkdir()
    names = cpio_list(tmp_path)
    assert names[0] == "."
    assert set(names) == {
        ".",
        "a",
        "a/b",
        "a/b/c.txt",
        "a-b",
        "a-b/d.txt",
        "a/z.txt",
        "top.txt",
        "link",
        "empty",
    }
    for i, name in enumerate(names[1:], 1):
        parent = name.rpartition("/")[0]
        if parent:
            assert names.index(parent) < i, name
    assert names == cpio_list(tmp_path)  # deterministic


def test_overlay_plan() -> None:
    plan = {f.path: f for f in overlay_plan(INPUTS)}
    assert plan["init"].mode == 0o755 and plan["init"].data == INPUTS.init
    assert plan["etc/bootenv/udhcpc.script"].mode == 0o755
    assert plan["etc/bootenv/modules"].data == b"ext4\nvirtio_blk\n"
    assert plan["etc/bootenv/modules-load"].data == b"ext4\n"
    assert plan[f"{PYTHON_DIR}/bootenv/cli.py"].data == b"x = 1\n"
    assert f"{PYTHON_DIR}/bootenv/__init__.py" in plan
    assert list(plan) == sorted(plan)
    assert all(not p.startswith("/") and ".." not in p.split("/") for p in plan)


def test_trim_keeps_the_code_page_mtools_needs() -> None:
    from bootenv.ramdisk_plan import drop_path

    gconv = "usr/lib/x86_64-linux-gnu/gconv/"
    for kept in ("IBM850.so", "IBM437.so", "gconv-modules", "gconv-modules.cache", "gconv-modules.d/x.conf"):
        assert not drop_path(gconv + kept), kept
    assert drop_path(gconv + "EBCDIC-FI-SE.so")


def init_functions(*names: str) -> str:
    """The named shell functions of the ramdisk's init, to run on their own."""
    import re

    init = (default_initramfs_dir() / "init").read_text()
    out = []
    for name in names:
        func = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", init, re.M | re.S)
        assert func is not None, f"init has no {name}() function"
        out.append(func.group(0))
    return "".join(out)


def dash(script: str, **env: str) -> str:
    """Run `script` with dash, the ramdisk's /bin/sh."""
    from bootenv.run import run

    return run(["dash", "-c", script], env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", **env}).stdout.decode()


def test_init_is_valid_posix_sh(allow_run: None) -> None:
    from bootenv.run import run

    run(["dash", "-n", str(default_initramfs_dir() / "init")])


@pytest.mark.parametrize(
    "args",
    [
        "bootenv.shell",
        "bootenv.shell=1",
        "bootenv.shell=yes",
        "bootenv.shell=true",
        "bootenv.shell=on",
        "bootenv.shell=Yes",
        "bootenv.shell=0",
        "bootenv.shell=off",
        "bootenv.shellfish=1 quiet",
        "bootenv.debug=1",
        # Quoted as the kernel allows: init split words at every space and kept the quotes.
        'bootenv.shell="1"',
        '"bootenv.shell=yes"',
        '"bootenv.shell"',
        'bootenv.shell="ON" bootenv.debug="1"',
        'bootenv.image="/srv/img bootenv.shell=1"',  # one word: the image's value
        'console=ttyS0 "quiet splash=1" bootenv.shell',
        "quiet -- bootenv.shell=1",  # after --, init's own arguments
        "bootenv.shell=* bootenv.debug=?",  # no file-name expansion
    ],
)
def test_init_reads_its_flags_as_the_agent_does(args: str, allow_run: None) -> None:
    """The init's own parse of bootenv.shell and bootenv.debug, run by dash, against the agent's."""
    from bootenv.cmdline import CmdlineError, parse_cmdline

    script = init_functions("kernel_words", "flag", "read_flags")
    script += 'DEBUG=0\nSHELL_FIRST=0\nprintf "%s\\n" "$ARGS" | { read_flags; echo "$SHELL_FIRST $DEBUG"; }\n'
    got = dash(script, ARGS=args).split()
    try:
        cfg = parse_cmdline(args if "bootenv.image=" in args else f"bootenv.image=/img {args}")
    except CmdlineError:  # an unknown key, not a boolean: the agent stops, and init turned nothing on
        assert got == ["0", "0"]
        return
    assert got == [str(int(cfg.shell)), str(int(cfg.debug))]


def test_init_takes_the_last_of_a_flag_given_twice(allow_run: None) -> None:
    """The agent refuses a key given twice; init, which runs before it, takes the last."""
    script = init_functions("kernel_words", "flag", "read_flags")
    script += 'DEBUG=0\nSHELL_FIRST=0\nprintf "%s\\n" "$ARGS" | { read_flags; echo "$SHELL_FIRST"; }\n'
    assert dash(script, ARGS="bootenv.shell=1 bootenv.shell=no").strip() == "0"
    assert dash(script, ARGS='bootenv.shell=no "bootenv.shell"').strip() == "1"


def test_init_splits_words_as_the_agent_does(allow_run: None) -> None:
    from bootenv.cmdline import split_cmdline

    text = 'a b=c "d=e f" g="h i" j=k" "l "m" n="" o -- p=q'
    words = dash(init_functions("kernel_words") + 'printf "%s\\n" "$ARGS" | kernel_words\n', ARGS=text)
    assert words.splitlines() == [p if v is None else f"{p}={v}" for p, v in split_cmdline(text)]


def test_init_splits_at_the_same_bytes_as_the_agent(allow_run: None) -> None:
    """The kernel's whitespace splits, for both; 0x1c-0x1f and U+00A0 (which
    str.isspace takes) split for neither."""
    from bootenv.cmdline import split_cmdline

    text = "a=1\x1cb=2\x1dc\x1ed\x1fe f=\u00a0g\vh\fi\rj\tk"
    words = dash(init_functions("kernel_words") + 'printf "%s\\n" "$ARGS" | kernel_words\n', ARGS=text)
    lines = words.split("\n")[:-1]  # not splitlines, which splits at 0x1c-0x1f too
    assert lines == [p if v is None else f"{p}={v}" for p, v in split_cmdline(text)]
    assert lines == ["a=1\x1cb=2\x1dc\x1ed\x1fe", "f=\u00a0g", "h", "i", "j", "k"]


def test_init_sees_a_failed_command_fail_through_its_log(allow_run: None) -> None:
    """`udevd --daemon ... | out` tested out's status: a udevd that did not start was
    taken as started, and init never loaded every module in its place."""
    script = "out() { sed 's/^/log: /'; }\n" + init_functions("logged")
    script += 'logged sh -c "echo up; exit 3" 2>&1; echo "status $?"\nlogged true; echo "status $?"\n'
    assert dash(script).splitlines() == ["log: up", "status 3", "status 0"]
    init = (default_initramfs_dir() / "init").read_text()
    assert 'logged "$UDEVD" --daemon' in init and '[ "$UDEV" = 1 ] || LOAD=/etc/bootenv/modules' in init


def test_built_in_keys_go_where_the_agent_reads_them_and_into_the_key(tmp_path: Path) -> None:
    from bootenv import agent
    from bootenv.cmdline import parse_cmdline
    from bootenv.errors import UserError
    from bootenv.ramdisk import trusted_keys
    from bootenv.signing import keygen

    keygen(tmp_path / "site")
    keys = trusted_keys([tmp_path / "site.pub"])
    with_keys = dataclasses.replace(INPUTS, trusted=keys)
    plan = {f.path: f for f in overlay_plan(with_keys)}
    assert plan["etc/bootenv/trusted/site.pub"].data == (tmp_path / "site.pub").read_bytes()
    assert ramdisk_key(with_keys) != ramdisk_key(INPUTS)
    assert base_key(with_keys) == base_key(INPUTS)  # no new debootstrap for a key
    # The agent reads that directory: lay the plan out under a root and ask it.
    (tmp_path / "root/etc/bootenv/trusted").mkdir(parents=True)
    (tmp_path / "root/etc/bootenv/trusted/site.pub").write_bytes(keys[0][1])
    trust = agent.trust(parse_cmdline("bootenv.image=/img"), tmp_path / "root" / str(agent.TRUSTED_DIR)[1:])
    assert len(trust.keys) == 1 and trust.configured
    (tmp_path / "k.txt").write_text("not a key\n")
    with pytest.raises(UserError, match="not a bootenv ed25519 public key"):
        trusted_keys([tmp_path / "k.txt"])
    with pytest.raises(UserError, match="a name of its own"):
        trusted_keys([tmp_path / "site.pub", tmp_path / "site.pub"])


# --- build-ramdisk -o: what a power cut leaves ----------------------------------------------


class PowerCut(BaseException):
    """The machine stops: what is on the disk at that moment is all there is."""


Tree = dict[str, bytes | None]  # each path under a root: a file's bytes, None for a directory


def _tree(root: Path) -> Tree:
    tree: Tree = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        for name in dirs:
            tree[(here / name).relative_to(root).as_posix()] = None
        for name in files:
            tree[(here / name).relative_to(root).as_posix()] = (here / name).read_bytes()
    return tree


def _restore(root: Path, tree: Tree) -> None:
    for path in list(root.iterdir()):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for rel, data in sorted(tree.items()):
        if data is None:
            (root / rel).mkdir()
        else:
            (root / rel).write_bytes(data)


def _served(tree: Tree) -> tuple[bytes | None, ...]:
    """What `bootenv serve --boot DIR` (or nginx) hands out: the files by their names, and
    the pair under the build the note names (what serve's scripts fetch)."""
    note = tree.get("boot/ramdisk.json")
    build = json.loads(note)["build"] if note else None
    return tuple(tree.get(f"boot/{name}") for name in ("vmlinuz", "initramfs.img", "ramdisk.json")) + tuple(
        tree.get(f"boot/{build}/{name}") if build else None for name in ("vmlinuz", "initramfs.img")
    )


def _ramdisk(root: Path, tag: str) -> ramdisk.Ramdisk:
    (root / tag).mkdir(parents=True)
    (root / tag / "vmlinuz").write_bytes(f"{tag} kernel".encode())
    (root / tag / "initramfs.img").write_bytes(f"{tag} initramfs, modules for the {tag} kernel".encode())
    return ramdisk.Ramdisk(root / tag / "vmlinuz", root / tag / "initramfs.img", tag, tag * 16, True)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
@pytest.mark.parametrize("cut", range(5))
def test_a_power_cut_during_an_export_leaves_a_matching_pair(
    cut: int, exchange: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The power fails before the `cut`th step that changes a name on the disk (a rename,
    a swap, a removal): the kernel, initramfs and note DIR holds then, and the pair under
    the build the note names, are the old ones or the new ones, never a new kernel with
    the old initramfs (which iPXE would boot); with no swap of two directories (NFS), DIR
    may be briefly gone, never mixed. The next export puts the old ones back if it
    fails, or makes the new ones, keeping the old build beside them, and leaves nothing
    else behind."""
    cache, disk = tmp_path / "cache", tmp_path / "disk"
    old, new = _ramdisk(cache, "old"), _ramdisk(cache, "new")
    out = disk / "boot"
    old_id = ramdisk_export.export(old, out).build
    old_files = _served(_tree(disk))
    new_id = ramdisk_export.export(new, tmp_path / "expected/boot").build
    new_files = _served(_tree(tmp_path / "expected"))
    assert old_files != new_files and None not in old_files + new_files
    assert old_files[3:] == old_files[:2] and new_files[3:] == new_files[:2]

    crashed: list[Tree] = []

    def step(real: Callable[..., Any]) -> Callable[..., Any]:
        def cut_here(*args: Any, **kwargs: Any) -> Any:
            if not crashed and steps.pop() == cut:
                crashed.append(_tree(disk))
            if crashed:
                raise PowerCut
            return real(*args, **kwargs)

        return cut_here

    def unsupported(*args: Any) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    steps = list(range(100, -1, -1))
    with monkeypatch.context() as patched:
        for module, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
            patched.setattr(module, name, step(getattr(module, name)))
        real_exchange = getattr(writeback, "exchange_at", None)
        patched.setattr(
            writeback, "exchange_at", step(real_exchange if exchange else unsupported), raising=False
        )
        with contextlib.suppress(PowerCut):
            ramdisk_export.export(new, out)
    after = crashed[0] if crashed else _tree(disk)
    served = _served(after)
    gone = (None,) * 5
    assert served in ((old_files, new_files) if exchange else (old_files, new_files, gone))

    _restore(disk, after)  # the machine is back: the next run starts from that disk
    with monkeypatch.context() as full:  # a run that fails puts back what was served
        full.setattr(ramdisk_export, "_write_temp", unsupported)
        with pytest.raises(UserError, match="cannot write"):
            ramdisk_export.export(new, out)
    assert _served(_tree(disk)) in (old_files, new_files)
    ramdisk_export.export(new, out)
    assert _served(_tree(disk)) == new_files
    pairs = [
        f"boot/{build}{name}" for build in (old_id, new_id) for name in ("", "/initramfs.img", "/vmlinuz")
    ]
    assert sorted(_tree(disk)) == sorted(
        ["boot", "boot/initramfs.img", "boot/ramdisk.json", "boot/vmlinuz", *pairs]
    )


def test_an_export_refuses_a_directory_holding_other_files_before_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is replaced whole: a file of someone else's in it would be lost."""
    out = tmp_path / "tftp"
    out.mkdir()
    (out / "undionly.kpxe").write_bytes(b"iPXE")
    (out / ".vmlinuz.tmp").write_bytes(b"an older bootenv's")

    def build(*args: object) -> Path:
        pytest.fail("built before refusing")

    monkeypatch.setattr(ramdisk, "build_base", build)
    with pytest.raises(UserError, match=r"holds 1 other entries \(first 'undionly.kpxe'\)"):
        ramdisk.build_ramdisk(INPUTS, output=out)
    rd = _ramdisk(tmp_path / "cache", "new")
    with pytest.raises(UserError, match="replaces the whole directory"):
        ramdisk_export.export(rd, out)
    assert sorted(os.listdir(out)) == [".vmlinuz.tmp", "undionly.kpxe"]
    assert sorted(os.listdir(tmp_path)) == ["cache", "tftp"]
    (out / "undionly.kpxe").unlink()
    build = ramdisk_export.export(rd, out).build  # an older bootenv's temp file is its own, and goes
    assert sorted(os.listdir(out)) == [build, "initramfs.img", "ramdisk.json", "vmlinuz"]


def test_an_export_refuses_a_build_directory_holding_other_files(tmp_path: Path) -> None:
    """DIR holds its builds' directories too: one named like a build but holding another
    file, or a symlink in a build's place, is someone else's, and refused."""
    out = tmp_path / "boot"
    rd = _ramdisk(tmp_path / "cache", "new")
    build = ramdisk_export.export(rd, out).build
    assert build is not None
    (out / build / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"holds 1 other entries \(first '{build}'\)"):
        ramdisk_export.export(rd, out)
    (out / build / "notes.txt").unlink()
    (out / "0123456789abcdef").symlink_to(tmp_path / "cache" / "new")
    with pytest.raises(UserError, match=r"holds 1 other entries \(first '0123456789abcdef'\)"):
        ramdisk_export.export(rd, out)
    assert (tmp_path / "cache/new/vmlinuz").read_bytes() == b"new kernel"
    (out / "0123456789abcdef").unlink()
    (out / "0123456789abcdef").mkdir()  # a build's, left with its kernel only: ours
    (out / "0123456789abcdef/vmlinuz").write_bytes(b"some kernel")
    ramdisk_export.export(rd, out)
    assert sorted(os.listdir(out)) == [build, "initramfs.img", "ramdisk.json", "vmlinuz"]


def _pair(tag: str) -> dict[str, bytes]:
    return {
        "vmlinuz": f"{tag} kernel".encode(),
        "initramfs.img": f"{tag} initramfs, modules for the {tag} kernel".encode(),
    }


def test_an_export_keeps_the_build_before_it_and_no_older(tmp_path: Path) -> None:
    """DIR holds the current build by the plain names and under its id (bootfiles), and
    the build before under its id, for a machine that fetched one file of it before the
    swap; the next build drops the oldest. The id is of the bytes, and the build before
    is linked, not copied (an initramfs is 50 MB)."""
    cache, out = tmp_path / "cache", tmp_path / "boot"

    def layout(*tags: str) -> Tree:
        tree: Tree = {"ramdisk.json": (out / "ramdisk.json").read_bytes(), **_pair(tags[0])}
        for tag in tags:
            tree[ids[tag]] = None
            tree.update({f"{ids[tag]}/{name}": data for name, data in _pair(tag).items()})
        return tree

    ids: dict[str, str] = {}
    for tag in ("one", "two", "three"):
        build = ramdisk_export.export(_ramdisk(cache, tag), out).build
        assert build is not None
        ids[tag] = build
        digests = [hashlib.sha256(data).digest() for data in _pair(tag).values()]
        assert build == bootfiles.build_id(*digests)
        assert json.loads((out / "ramdisk.json").read_bytes())["build"] == build
    assert len(set(ids.values())) == 3
    assert _tree(out) == layout("three", "two")
    inode = (out / ids["three"] / "initramfs.img").stat().st_ino
    assert (out / "initramfs.img").stat().st_ino == inode
    ramdisk_export.export(_ramdisk(cache, "four"), out)
    assert (out / ids["three"] / "initramfs.img").stat().st_ino == inode
    # The current build exported again: the build kept is still the one before it.
    ramdisk_export.export(
        ramdisk.Ramdisk(cache / "four/vmlinuz", cache / "four/initramfs.img", "4", "k", True), out
    )
    ids["four"] = json.loads((out / "ramdisk.json").read_bytes())["build"]
    assert _tree(out) == layout("four", "three")


def _modes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *root.rglob("*")]
    }


def test_an_export_is_readable_by_nginx_whatever_the_umask(tmp_path: Path) -> None:
    """nginx's worker (www-data) reads -o DIR, not root: exported under umask 027 from a
    cache whose files the umask (or the kernel package: 0600) also took, DIR was 0750
    and its files 0640, a 403 to every machine. Every file is 0644 and every directory
    0755, a parent the export makes and the build before (exported under that umask) too."""
    cache, out = tmp_path / "cache", tmp_path / "srv/boot"
    old = os.umask(0o027)
    try:
        first = ramdisk_export.export(_ramdisk(cache, "one"), out).build
        assert first is not None
        for name in bootfiles.PAIR:  # as an export before this fix left it
            (out / first / name).chmod(0o640)
        new = _ramdisk(cache, "two")
        new.vmlinuz.chmod(0o600)
        new.initramfs.chmod(0o640)
        build = ramdisk_export.export(new, out).build
    finally:
        os.umask(old)
    assert build is not None
    modes = _modes(out)
    assert set(modes) == {
        ".",
        *ramdisk_export.OUTPUT_FILES,
        build,
        first,
        *(f"{b}/{name}" for b in (build, first) for name in bootfiles.PAIR),
    }
    assert {path: mode for path, mode in modes.items() if mode != 0o644} == {
        ".": 0o755,
        build: 0o755,
        first: 0o755,
    }
    assert stat.S_IMODE((tmp_path / "srv").stat().st_mode) == 0o755


def fake_nics(root: Path, nics: dict[str, str]) -> Path:
    """A /sys/class/net of physical NICs (name: MAC) plus lo, which has no device link."""
    for name, mac in {"lo": "00:00:00:00:00:00", **nics}.items():
        (root / name).mkdir(parents=True)
        (root / name / "address").write_text(mac + "\n")
        (root / name / "carrier").write_text("1\n")
        if name != "lo":
            (root / name / "device").mkdir()
    return root


def test_init_tries_the_nic_the_machine_booted_from_first(tmp_path: Path, allow_run: None) -> None:
    """serve's BOOTIF names the NIC iPXE booted from: init brings it up before a
    management NIC that sorts first and may get a lease that does not reach serve."""
    from bootenv.menu import BootSpec

    net = fake_nics(tmp_path / "net", {"eno1": "52:54:00:00:00:01", "eno2": "52:54:00:ab:cd:0e"})
    cmdline = BootSpec("http://10.0.2.2:8080", "52:54:00:ab:cd:0e", "http://x/i", "all").kernel_cmdline()
    script = init_functions("kernel_words", "boot_mac", "nic_order")
    script += 'mac=$(printf "%s\\n" "$ARGS" | boot_mac); echo "$mac"; nic_order "$NET" "$mac"\n'
    assert dash(script, ARGS=cmdline, NET=str(net)).splitlines() == ["52:54:00:ab:cd:0e", "eno2 eno1"]
    # No BOOTIF (a ramdisk booted some other way), or one in upper case.
    assert dash(script, ARGS="quiet", NET=str(net)).splitlines() == ["", "eno1 eno2"]
    got = dash(script, ARGS="BOOTIF=01-52-54-00-AB-CD-0E", NET=str(net)).splitlines()
    assert got == ["52:54:00:ab:cd:0e", "eno2 eno1"]
    init = (default_initramfs_dir() / "init").read_text()
    assert 'BOOT_MAC=$(boot_mac </proc/cmdline)\nNICS=$(nic_order "$SYS_NET" "$BOOT_MAC")' in init


def test_init_retries_dhcp_until_a_lease(tmp_path: Path, allow_run: None) -> None:
    """A switch port without portfast forwards nothing for about 30 s: a round of DHCP
    with no answer is followed by another, until the time given is up."""
    net = fake_nics(tmp_path / "net", {"eno1": "52:54:00:00:00:01"})
    count = tmp_path / "rounds"
    bb = tmp_path / "busybox"  # udhcpc answers at its third round
    bb.write_text(f'#!/bin/sh\necho x >>{count}\n[ "$(wc -l <{count})" -ge 3 ]\n')
    bb.chmod(0o755)
    script = 'say() { echo "$*"; }\nout() { cat; }\nip() { [ "$1" != -4 ] || echo inet; }\n'
    script += init_functions("logged", "uptime_s", "dhcp_on")
    script += 'dhcp_on eno1 "$WAIT"; echo "status $? NIC=$NIC"\n'
    got = dash(script, SYS_NET=str(net), BB=str(bb), WAIT="120").splitlines()
    assert got[-1] == "status 0 NIC=eno1"
    assert [line for line in got if line.startswith("DHCP on")][
        -1
    ] == "DHCP on eno1 (52:54:00:00:00:01), round 3"
    count.unlink()
    got = dash(script, SYS_NET=str(net), BB=str(bb), WAIT="0").splitlines()
    assert got[-1] == "status 1 NIC="  # one round only, then init moves on
    assert count.read_text() == "x\n"
