"""The pure parts of target configuration: file texts, grub's images, the runtime's argv."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bootenv.bootloader import early_config, grub_cfg_text, patch_core, patch_mbr
from bootenv.errors import FatalError
from bootenv.runtime import parse_ldd, python_argv
from bootenv.target import (
    SSH_UNIT,
    Identity,
    LayoutHandoff,
    configure,
    fstab_text,
    hosts_text,
    layout_argv,
    layout_json,
    layout_unit_text,
    new_identity,
    ssh_keygen_unit_text,
    systemd_quote,
)

IDENT = Identity("0b0e9a55-1f2c-4d6e-8a9b-c0d1e2f3a4b5", "1a2b3c4d", "web1.example.org")
HANDOFF = LayoutHandoff(
    image="http://10.0.2.2:8080/lamp",
    components=("apache", "php"),
    callback="http://10.0.2.2:9000/cb?id=50%",
    hostname="web1.example.org",
)


def test_fstab_by_uuid() -> None:
    lines = [line.split() for line in fstab_text(IDENT).splitlines() if not line.startswith("#")]
    assert lines == [
        ["UUID=0b0e9a55-1f2c-4d6e-8a9b-c0d1e2f3a4b5", "/", "ext4", "errors=remount-ro", "0", "1"],
        ["UUID=1A2B-3C4D", "/boot/efi", "vfat", "umask=0077,nofail", "0", "2"],
    ]


def test_identities_differ() -> None:
    a, b = new_identity(None), new_identity(None)
    assert a.root_uuid != b.root_uuid and a.esp_id != b.esp_id and a.hostname != b.hostname
    assert a.hostname == f"bootenv-{a.root_uuid[:8]}"
    assert new_identity("db1").hostname == "db1"


def test_hosts() -> None:
    old = "127.0.0.1\tlocalhost\n127.0.1.1\tgold\n::1\tlocalhost ip6-localhost\n"
    assert hosts_text(old, "web1.example.org") == (
        "127.0.0.1\tlocalhost\n127.0.1.1\tweb1.example.org web1\n::1\tlocalhost ip6-localhost\n"
    )
    assert hosts_text("", "db1") == "127.0.0.1\tlocalhost\n127.0.1.1\tdb1\n"


def test_layout_json() -> None:
    doc = json.loads(layout_json(HANDOFF))
    assert doc == {
        "version": 1,
        "image": "http://10.0.2.2:8080/lamp",
        "components": ["apache", "php"],
        "callback": "http://10.0.2.2:9000/cb?id=50%",
        "hostname": "web1.example.org",
        "insecure": False,
        "trust": None,
    }


def test_layout_unit_runs_the_bundled_runtime() -> None:
    text = layout_unit_text(HANDOFF)
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(
        "ExecStart=/opt/bootenv/lib/ld-linux-x86-64.so.2 --library-path /opt/bootenv/lib"
    )
    assert "/opt/bootenv/bin/python3 -s -m bootenv layout --image http://10.0.2.2:8080/lamp" in exec_start
    assert "--components apache,php --root /" in exec_start
    assert "--callback http://10.0.2.2:9000/cb?id=50%%" in exec_start  # % escaped for systemd
    assert "Environment=PYTHONHOME=/opt/bootenv PYTHONPATH=/opt/bootenv/site" in text
    post = next(line for line in text.splitlines() if line.startswith("ExecStartPost="))
    assert "shutil.rmtree('/opt/bootenv')" in post and "layout.json.done" in post
    assert "ConditionPathExists=/etc/bootenv/layout.json" in text
    assert "WantedBy=multi-user.target" in text
    assert "/usr/bin/python" not in text  # never the target's own python
    # `done` (the layout's last event) comes once the machine has its SSH host keys.
    after = next(line for line in text.splitlines() if line.startswith("After="))
    assert SSH_UNIT in after.split()


def test_layout_argv_flags() -> None:
    h = LayoutHandoff("http://h/i", (), None, "x", insecure=True, trust="sha256:" + "0" * 64)
    assert layout_argv(h) == [
        *("layout", "--image", "http://h/i", "--components", "none", "--root", "/", "--retries", "5"),
        *("--deadline", "6900", "--fingerprint", "sha256:" + "0" * 64, "--insecure"),
    ]


def test_the_layout_deadline_comes_before_the_units_timeout() -> None:
    """Past its deadline the layout posts a fatal error; killed by the unit, it could not."""
    text = layout_unit_text(LayoutHandoff("http://h/i", (), None, "x"))
    timeout = next(line for line in text.splitlines() if line.startswith("TimeoutStartSec="))
    hours = int(timeout.removeprefix("TimeoutStartSec=").removesuffix("h"))
    assert " --deadline 6900\n" in text and hours * 3600 - 60 > 6900


def test_ssh_unit() -> None:
    text = ssh_keygen_unit_text()
    assert "ExecStart=/usr/bin/ssh-keygen -A" in text
    assert "ExecStartPost=/usr/bin/sync -f /etc/ssh/ssh_host_ed25519_key" in text  # durable at once
    assert "Before=ssh.service" in text


def test_configure_on_a_tree(tmp_path: Path) -> None:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    (tmp_path / "etc/ssh/ssh_host_rsa_key").write_text("gold's secret")
    (tmp_path / "etc/machine-id").write_text("096abde7cbba4fe9a427d28bc4b2975a\n")
    (tmp_path / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 gold\n")
    configure(tmp_path, IDENT, HANDOFF, "ssh-ed25519 AAAA me@host")
    configure(tmp_path, IDENT, HANDOFF, "ssh-ed25519 AAAA me@host")  # idempotent
    assert (tmp_path / "etc/machine-id").read_bytes() == b""
    assert not (tmp_path / "etc/ssh/ssh_host_rsa_key").exists()
    assert (tmp_path / "etc/hostname").read_text() == "web1.example.org\n"
    assert (tmp_path / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAA me@host\n"
    assert (tmp_path / "root/.ssh").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "etc/bootenv/layout.json").stat().st_mode & 0o777 == 0o600
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["bootenv-layout.service", "bootenv-ssh-keygen.service"]
    assert (tmp_path / "boot/efi").is_dir()


def test_configure_keeps_the_golds_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """A Latin-1 byte in the gold's /etc/hosts or authorized_keys ended the agent in a
    UnicodeDecodeError traceback, on a disk already written."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hosts").write_bytes(b"# caf\xe9 rack 3\n127.0.0.1 localhost\n127.0.1.1 gold\n")
    (tmp_path / "root/.ssh").mkdir(parents=True)
    (tmp_path / "root/.ssh/authorized_keys").write_bytes(b"ssh-rsa BBBB jos\xe9@gold")
    configure(tmp_path, IDENT, HANDOFF, "ssh-ed25519 AAAA me@host")
    assert (tmp_path / "etc/hosts").read_bytes() == (
        b"# caf\xe9 rack 3\n127.0.0.1 localhost\n127.0.1.1\tweb1.example.org web1\n"
    )
    keys = tmp_path / "root/.ssh/authorized_keys"
    assert keys.read_bytes() == b"ssh-rsa BBBB jos\xe9@gold\nssh-ed25519 AAAA me@host\n"
    assert keys.stat().st_mode & 0o777 == 0o600


def test_grub_cfg() -> None:
    text = grub_cfg_text(IDENT.root_uuid, "/vmlinuz", "/initrd.img", ("root=UUID=u", "ro"), "web1")
    assert f"search --no-floppy --fs-uuid --set=root {IDENT.root_uuid}" in text
    assert "\tlinux /vmlinuz root=UUID=u ro\n\tinitrd /initrd.img\n" in text
    assert "initrd" not in grub_cfg_text("u", "/boot/vmlinuz-6.1", None, ("ro",), "x")
    assert early_config("abc") == "search.fs_uuid abc root\nset prefix=($root)/boot/grub\n"


def test_patch_mbr_keeps_the_partition_table() -> None:
    boot_img = bytes(range(256)) * 2
    old = bytearray(512)
    old[0x1B8:0x1BC] = b"SIGN"
    old[0x1BE + 4] = 0xEE  # protective MBR entry
    old[0x1FE:] = b"\x55\xaa"
    mbr = patch_mbr(boot_img, bytes(old), 2048)
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 2048
    assert mbr[0x64] == 0xFF and mbr[0x66:0x68] == b"\x90\x90"
    assert mbr[0x1B8:0x1FE] == bytes(old[0x1B8:0x1FE])
    assert mbr[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert mbr[0x03:0x5A] == bytes(old[0x03:0x5A])


def test_patch_core_blocklist() -> None:
    core = bytearray(512 * 60 + 100)
    struct.pack_into("<QHH", core, 0x1F4, 2, 0, 0x820)
    out = patch_core(bytes(core), 2048, 1 << 20)
    assert len(out) == 512 * 61
    assert struct.unpack_from("<QHH", out, 0x1F4) == (2049, 60, 0x820)
    with pytest.raises(FatalError, match="does not fit"):
        patch_core(bytes(core), 2048, 512 * 10)


def test_parse_ldd() -> None:
    out = (
        "/usr/bin/python3.11:\n"
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1)\n"
        "\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f2)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n"
        "/x/_ssl.so:\n\tnot a dynamic executable\n"
    )
    assert parse_ldd(out) == [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/lib64/ld-linux-x86-64.so.2",
    ]
    assert python_argv("/opt/x")[-2:] == ["/opt/x/bin/python3", "-s"]


def _systemd_words(line: str) -> list[str]:
    """What systemd makes of an ExecStart= value, per systemd.service(5): % specifiers
    (only %% here), then words split at whitespace outside quotes with C escapes undone,
    then $$ to $ in each word at exec time."""
    line = line.replace("%%", "\0")
    assert "%" not in line, "an unescaped specifier"
    line = line.replace("\0", "%")
    words, word, quote, i, started = [], "", "", 0, False
    while i < len(line):
        c = line[i]
        if c == "\\":
            nxt = line[i + 1]
            if nxt == "x":
                word, i = word + chr(int(line[i + 2 : i + 4], 16)), i + 4
            else:
                word, i = word + nxt, i + 2
            started = True
            continue
        if quote and c == quote:
            quote = ""
        elif not quote and c in "\"'":
            quote, started = c, True
        elif not quote and c.isspace():
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + c, True
        i += 1
    assert not quote, "an unclosed quote"
    if started:
        words.append(word)
    for w in words:
        assert "$" not in w.replace("$$", ""), f"an unescaped $ in {w!r}"
    return [w.replace("$$", "$") for w in words]


@pytest.mark.parametrize(
    "word",
    [
        "plain",
        "http://10.0.0.1/cb/a\\x41b",
        "a b",
        'say "hi"',
        "it's",
        "100%",
        "${HOME}$PATH",
        "\\$$",
        "tab\there",
        "semi;colon",
        "",
        "http://[fe80::1]:8080/img?x=%41&y=$1",
    ],
)
def test_a_word_of_the_units_command_line_reaches_the_layout_as_it_was(word: str) -> None:
    line = f"/opt/bootenv/bin/python3 -m bootenv --callback {systemd_quote(word)} --root /"
    assert _systemd_words(line) == [
        "/opt/bootenv/bin/python3",
        "-m",
        "bootenv",
        "--callback",
        word,
        "--root",
        "/",
    ]
