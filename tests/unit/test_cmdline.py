"""The kernel command line → AgentConfig: every key, the kernel's quoting, bad input."""

from __future__ import annotations

import pytest

from bootenv.cmdline import (
    AgentConfig,
    CmdlineError,
    DiskKind,
    DiskSelector,
    Handoff,
    parse_cmdline,
    split_cmdline,
)

IMG = "bootenv.image=http://10.0.2.2:8080/img"
FP = "sha256:" + "ab" * 32


def test_all_keys() -> None:
    cfg = parse_cmdline(
        "BOOT_IMAGE=/vmlinuz console=ttyS0 quiet "
        f"{IMG} bootenv.components=apache,php bootenv.disk=serial:QM0001 "
        "bootenv.callback=http://10.0.2.2:9000/cb bootenv.handoff=reboot bootenv.hostname=web1.example.org "
        "bootenv.ssh_key=ssh-ed25519%20AAAAC3Nza%20me@host bootenv.debug bootenv.shell=0 "
        f"bootenv.insecure=yes bootenv.trust={FP.upper().replace('SHA256', 'sha256')}\n"
    )
    assert cfg == AgentConfig(
        image="http://10.0.2.2:8080/img",
        components=("apache", "php"),
        disk=DiskSelector(DiskKind.SERIAL, "QM0001"),
        callback="http://10.0.2.2:9000/cb",
        handoff=Handoff.REBOOT,
        hostname="web1.example.org",
        ssh_key="ssh-ed25519 AAAAC3Nza me@host",
        debug=True,
        shell=False,
        insecure=True,
        trust=FP,
    )


def test_defaults() -> None:
    cfg = parse_cmdline(IMG)
    assert cfg.components is None and cfg.wanted_components == "all"
    assert cfg.disk == DiskSelector() and str(cfg.disk) == "auto"
    assert cfg.handoff is Handoff.KEXEC
    assert (cfg.callback, cfg.hostname, cfg.ssh_key, cfg.trust) == (None, None, None, None)
    assert not (cfg.debug or cfg.shell or cfg.insecure or cfg.single)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("bootenv.single", True),
        ("bootenv.single=1", True),
        ("bootenv.single=on", True),
        ("bootenv.single=0", False),
        ("bootenv.single=no", False),
        ("bootenv.single=1 bootenv.components=all", True),
    ],
)
def test_single(text: str, want: bool) -> None:
    cfg = parse_cmdline(f"{IMG} {text}")
    assert cfg.single is want
    assert cfg.components is None  # the single image holds every component


def test_single_override() -> None:
    assert parse_cmdline(IMG, {"single": "1"}).single
    assert not parse_cmdline(f"{IMG} bootenv.single", {"single": "0"}).single


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("all", None),
        ("none", ()),
        ("mysql", ("mysql",)),
    ],
)
def test_components(text: str, want: tuple[str, ...] | None) -> None:
    cfg = parse_cmdline(f"{IMG} bootenv.components={text}")
    assert cfg.components == want
    assert cfg.wanted_components == ("all" if want is None else list(want))


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("auto", DiskKind.AUTO, ""),
        ("/dev/nvme0n1", DiskKind.DEVICE, "/dev/nvme0n1"),
        ("serial:S3Z9NX0K", DiskKind.SERIAL, "S3Z9NX0K"),
        ("path:pci-0000:00:04.0", DiskKind.PATH, "pci-0000:00:04.0"),
    ],
)
def test_disk(text: str, kind: DiskKind, value: str) -> None:
    sel = parse_cmdline(f"{IMG} bootenv.disk={text}").disk
    assert (sel.kind, sel.value) == (kind, value)
    assert str(sel) == text


def test_split_like_the_kernel() -> None:
    assert split_cmdline('a "b=c d" e="f g" h=i" "j k="" "l" -- n=o') == [
        ("a", None),
        ("b", "c d"),
        ("e", "f g"),
        ("h", 'i" "j'),
        ("k", ""),
        ("l", None),
    ]
    # An unterminated quote runs to the end of the line, as in the kernel.
    assert split_cmdline('m=" x -- y') == [("m", " x -- y")]
    assert split_cmdline("  x=1\t\ny  ") == [("x", "1"), ("y", None)]
    assert split_cmdline("") == []


@pytest.mark.parametrize("sep", [" ", "\t", "\n", "\v", "\f", "\r"])
def test_split_at_the_kernels_whitespace(sep: str) -> None:
    """lib/ctype.c's _S class: the only characters next_arg splits at (bar 0xA0)."""
    assert split_cmdline(f"quiet=x{sep}bootenv.image=http://h/i{sep}") == [
        ("quiet", "x"),
        ("bootenv.image", "http://h/i"),
    ]


@pytest.mark.parametrize("byte", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2028", "\u3000"])
def test_other_spaces_do_not_split(byte: str) -> None:
    """str.isspace takes these, the kernel and init do not: the agent read a second
    parameter hidden inside another's value, which init never saw."""
    text = f"quiet=x{byte}bootenv.image=http://evil/i {IMG}"
    assert split_cmdline(text) == [
        ("quiet", f"x{byte}bootenv.image=http://evil/i"),
        ("bootenv.image", IMG[14:]),
    ]
    assert parse_cmdline(text).image == "http://10.0.2.2:8080/img"
    with pytest.raises(CmdlineError, match="not printable ASCII"):
        parse_cmdline(f"{IMG}{byte}bootenv.insecure")


def test_a_raw_a0_byte_stays_in_its_word() -> None:
    """The kernel's Latin-1 table has 0xA0 as a space; init's awk and the agent keep it
    in the word, where a bootenv.* value holding it is refused."""
    raw = b"bootenv.image=http://h/i\xa0bootenv.insecure"
    text = raw.decode("utf-8", "surrogateescape")
    assert split_cmdline(text) == [("bootenv.image", "http://h/i\udca0bootenv.insecure")]
    with pytest.raises(CmdlineError, match=r"http://h/i\\xa0bootenv.insecure is not printable ASCII"):
        parse_cmdline(text)


def test_quoted_values_reach_the_config() -> None:
    cfg = parse_cmdline(f'{IMG} "bootenv.ssh_key=ssh-rsa AAAAB3 root@admin" bootenv.hostname="db1"')
    assert cfg.ssh_key == "ssh-rsa AAAAB3 root@admin"
    assert cfg.hostname == "db1"


def test_after_double_dash_belongs_to_init() -> None:
    cfg = parse_cmdline(f"{IMG} -- bootenv.bogus=1 bootenv.handoff=none")
    assert cfg.handoff is Handoff.KEXEC


def test_overrides_replace_the_cmdline() -> None:
    cfg = parse_cmdline(f"{IMG} bootenv.handoff=reboot", {"handoff": "none", "disk": "/dev/sdb"})
    assert cfg.handoff is Handoff.NONE and cfg.disk.value == "/dev/sdb"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"{IMG} bootenv.imag=http://x/", "unknown kernel parameter bootenv.imag"),
        (f"{IMG} bootenv.disk=auto bootenv.disk=/dev/sda", "given twice"),
        ("bootenv.components=all", "bootenv.image is missing"),
        ("bootenv.image=ftp://host/img", "not an http"),
        ("bootenv.image=", "needs a value"),
        (f"{IMG} bootenv.disk=sda", "not auto, /dev/X"),
        (f"{IMG} bootenv.disk=uuid:1234", "not auto, /dev/X"),
        (f"{IMG} bootenv.disk=/dev/../etc/passwd", "not auto, /dev/X"),
        (f"{IMG} bootenv.handoff=poweroff", "not one of kexec, reboot, none"),
        (f"{IMG} bootenv.hostname=-bad-", "not a valid host name"),
        (f"{IMG} bootenv.hostname=a_b", "not a valid host name"),
        (f"{IMG} bootenv.hostname=" + "a" * 64, "not a valid host name"),
        # Each label is valid, but sethostname(2) takes 64 bytes, and /etc/hostname the FQDN.
        (f"{IMG} bootenv.hostname=web1." + "a" * 60, "is 65 characters, over the kernel's 64"),
        (f"{IMG} bootenv.hostname=" + ".".join(["a" * 63] * 3), "is 191 characters, over the kernel's 64"),
        (f"{IMG} bootenv.components=apache,,php", "not a component name"),
        (f"{IMG} bootenv.components=Apache", "not a component name"),
        (f"{IMG} bootenv.components=a,a", "twice"),
        (f"{IMG} bootenv.components=os", "not a component name"),
        (f"{IMG} bootenv.ssh_key=hello", "not one SSH public key"),
        (
            f"{IMG} bootenv.ssh_key=ssh-ed25519%20AAA%0Assh-rsa%20BBB",
            "not printable ASCII once percent-decoded",
        ),
        # Checked once decoded: the percent-encoded text itself is printable ASCII.
        (f"{IMG} bootenv.ssh_key=ssh-ed25519%20AAA%0D%20me", r"AAA\\r me is not printable ASCII once"),
        (f"{IMG} bootenv.ssh_key=ssh-ed25519%20AAA%00%20me", r"AAA\\x00 me is not printable ASCII once"),
        (
            f"{IMG} bootenv.ssh_key=ssh-ed25519%20AAA%20jos%C3%A9",
            r"jos\\xc3\\xa9 is not printable ASCII once",
        ),
        (f"{IMG} bootenv.ssh_key=ssh-ed25519%09AAA%20me", "not printable ASCII once percent-decoded"),
        (f"{IMG} bootenv.debug=maybe", "not a boolean"),
        (f"{IMG} bootenv.callback=not-a-url", "not an http"),
        (f"{IMG} bootenv.trust=deadbeef", "not a key fingerprint"),
        (f"{IMG} bootenv.callback", "needs a value"),
        (f"{IMG} bootenv.single=maybe", "not a boolean"),
        (f"{IMG} bootenv.single bootenv.components=mysql", "components must be all"),
        (f"{IMG} bootenv.single bootenv.components=none", "components must be all"),
        (f"{IMG} bootenv.single bootenv.single=0", "given twice"),
    ],
)
def test_bad_input_is_one_clear_error(text: str, match: str) -> None:
    with pytest.raises(CmdlineError, match=match) as info:
        parse_cmdline(text)
    assert info.value.exit_code == 2


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(CmdlineError, match="unknown agent setting"):
        parse_cmdline(IMG, {"colour": "blue"})


def test_local_directory_image_is_accepted() -> None:
    assert parse_cmdline("bootenv.image=/srv/images/lamp").image == "/srv/images/lamp"


NL_VALUES = {
    "hostname": "web1\n",
    "components": "web\n",
    "trust": FP + "\n",
    "disk": "/dev/sda\n",
    "handoff": "none\n",
}


@pytest.mark.parametrize("key", sorted(NL_VALUES))
def test_a_trailing_newline_is_refused(key: str) -> None:
    """`$` matches before a trailing newline: `bootenv.hostname=web1\\n` (kernel-quoted,
    or an override) was accepted, and the newline reached /etc/hosts and grub.cfg."""
    value = NL_VALUES[key]
    with pytest.raises(CmdlineError, match=rf"bootenv\.{key}=.*\\n") as info:
        parse_cmdline(f'{IMG} "bootenv.{key}={value}"\n')
    assert "\n" not in str(info.value)
    with pytest.raises(CmdlineError):
        parse_cmdline(IMG, {key: value})
    # Unquoted, the newline ends the word: the value is taken without it.
    unquoted = parse_cmdline(f"{IMG} bootenv.{key}={value}")
    assert unquoted == parse_cmdline(f"{IMG} bootenv.{key}={value.rstrip()}")
    assert unquoted != parse_cmdline(IMG)


def test_the_value_checks_match_whole_values() -> None:
    """Each check holds on its own, not only behind the printable-ASCII one."""
    from bootenv.cmdline import _components, _trust, check_hostname

    for check, value in ((check_hostname, "web1\n"), (_components, "web\n"), (_trust, FP + "\n")):
        with pytest.raises(CmdlineError):
            check(value)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"bootenv.hostname=caf\xe9", r"bootenv.hostname=caf\xe9 is not printable ASCII"),
        (b"bootenv.hostname=caf\xc3\xa9", r"bootenv.hostname=caf\xc3\xa9 is not printable ASCII"),
        (b"bootenv.callback=http://h/\xe9", r"bootenv.callback=http://h/\xe9 is not printable ASCII"),
        (b"bootenv.im\xe4ge=x", r"unknown kernel parameter bootenv.im\xe4ge"),
    ],
)
def test_bytes_that_are_not_ascii_are_refused_in_one_line(raw: bytes, shown: str) -> None:
    """The command line is read as bytes with surrogateescape (it need not be UTF-8): a
    value the agent uses must be printable ASCII, and the message shows the bytes."""
    text = f"{IMG} ".encode() + raw
    with pytest.raises(CmdlineError) as info:
        parse_cmdline(text.decode("utf-8", "surrogateescape"))
    message = str(info.value)
    assert shown in message and message.isascii() and message.isprintable()


def test_local_image_is_not_reachable_from_the_target() -> None:
    assert parse_cmdline("bootenv.image=/srv/images/lamp").local_image
    assert not parse_cmdline(IMG).local_image


def test_a_host_name_of_64_characters_is_the_longest() -> None:
    fqdn = "web1." + "a" * 59
    assert len(fqdn) == 64 and parse_cmdline(f"{IMG} bootenv.hostname={fqdn}").hostname == fqdn


def test_the_callback_of_a_command_line_that_does_not_parse() -> None:
    from bootenv.cmdline import callback_of

    cb = "http://10.0.2.2:9000/callback/52:54:00:12:34:56"
    assert callback_of(f"{IMG} bootenv.callback={cb} bootenv.colour=blue") == cb
    assert callback_of(f'{IMG} "bootenv.callback={cb}" bootenv.disk=sda') == cb
    assert callback_of(f"{IMG} bootenv.callback={cb}", {"callback": "http://other/cb"}) == "http://other/cb"
    for bad in (
        "",
        f"bootenv.callback={cb} bootenv.callback={cb}",
        "bootenv.callback=ftp://x/",
        "bootenv.callback",
    ):
        assert callback_of(f"{IMG} {bad}") is None, bad
    assert callback_of(f"{IMG} bootenv.callback={cb}\udce9") is None
