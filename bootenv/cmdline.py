"""The agent's configuration: the `bootenv.*` parameters of the kernel command line.

Parsed once, at the edge, into a frozen AgentConfig; nothing is read at import time.
Words are split the way the kernel splits them (see `split_cmdline`), unknown
`bootenv.*` keys and repeated keys are errors, and every value is checked here so that
the agent never starts on a disk with a typo in its configuration. See docs/AGENT.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

from bootenv.errors import UserError
from bootenv.urls import split_http_url

PREFIX = "bootenv."
# Used with fullmatch only: `$` would also match before a trailing newline.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TRUST = re.compile(r"sha256:[0-9a-f]{64}")
_KEY_TYPES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")
# The kernel's whitespace (isspace in lib/ctype.c), which initramfs/init's awk splits
# on too. Not str.isspace: that also takes 0x1c-0x1f, U+0085, U+00A0 and the Unicode
# spaces, which the kernel and init keep inside a word. The kernel's Latin-1 table also
# has 0xA0; a raw 0xA0 byte reaches us as a surrogate and stays in the word here, as in
# init, so a bootenv.* value holding one is refused as not printable ASCII.
_SPACE = frozenset(" \t\n\v\f\r")


class CmdlineError(UserError):
    """A `bootenv.*` parameter is unknown, repeated or has a bad value."""


class Handoff(StrEnum):
    KEXEC = "kexec"  # boot the target's kernel straight from the ramdisk (default)
    REBOOT = "reboot"  # reboot; the firmware boots the disk through the installed grub
    NONE = "none"  # stay in the ramdisk (debugging, tests)


class DiskKind(StrEnum):
    AUTO = "auto"
    DEVICE = "device"  # /dev/X
    SERIAL = "serial"  # serial:S, udev's ID_SERIAL or ID_SERIAL_SHORT
    PATH = "path"  # path:P, udev's ID_PATH (as in /dev/disk/by-path/P)


@dataclass(frozen=True)
class DiskSelector:
    kind: DiskKind = DiskKind.AUTO
    value: str = ""

    def __str__(self) -> str:
        if self.kind is DiskKind.AUTO:
            return "auto"
        if self.kind is DiskKind.DEVICE:
            return self.value
        return f"{self.kind.value}:{self.value}"


@dataclass(frozen=True)
class AgentConfig:
    image: str
    components: tuple[str, ...] | None = None  # None: all the image's components
    disk: DiskSelector = DiskSelector()
    callback: str | None = None
    handoff: Handoff = Handoff.KEXEC
    hostname: str | None = None
    ssh_key: str | None = None
    debug: bool = False
    shell: bool = False
    insecure: bool = False
    trust: str | None = None
    single: bool = False  # write the classic one-piece image; lay out no components

    @property
    def wanted_components(self) -> str | list[str]:
        """In the form `manifest.resolve_components` takes."""
        return "all" if self.components is None else list(self.components)

    @property
    def local_image(self) -> bool:
        """The image is a directory on the ramdisk, which the installed system cannot reach."""
        return split_http_url(self.image) is None


KEYS = (
    "image",
    "components",
    "disk",
    "callback",
    "handoff",
    "hostname",
    "ssh_key",
    "debug",
    "shell",
    "insecure",
    "trust",
    "single",
)
FLAGS = ("debug", "shell", "insecure", "single")


def split_cmdline(text: str) -> list[tuple[str, str | None]]:
    """Split a command line into (param, value) pairs exactly as the kernel does.

    Words are separated by the kernel's whitespace (space, \\t, \\n, \\v, \\f, \\r)
    outside double quotes; other control bytes and Unicode spaces stay in the word, as
    in initramfs/init (and in the kernel, but for 0xA0: see _SPACE). A quote toggles
    quoting wherever it appears, but only a quote opening the word or the value, and
    the quote closing the word, are removed (`next_arg` in the kernel's
    lib/cmdline.c): so `"a=b c"`, `a="b c"` and `a=b" "c` are all one word. A word
    without `=` has no value. Everything after a bare `--` belongs to init, not to the
    kernel, and is ignored.
    """
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            break
        quoted = text[i] == '"'
        start = i + 1 if quoted else i
        in_quote = quoted
        j = start
        equals = -1
        while j < n and (in_quote or text[j] not in _SPACE):
            if equals < 0 and text[j] == "=":
                equals = j
            if text[j] == '"':
                in_quote = not in_quote
            j += 1
        if equals < 0:
            param_end = j - 1 if quoted and j > start and text[j - 1] == '"' else j
            param, value = text[start:param_end], None
        else:
            param, value = text[start:equals], text[equals + 1 : j]
            if value.startswith('"'):
                value = value[1:]
                if value.endswith('"'):
                    value = value[:-1]
            elif quoted and value.endswith('"'):
                value = value[:-1]
        if param == "--" and value is None:
            break
        out.append((param, value))
        i = j
    return out


def parse_cmdline(text: str, overrides: Mapping[str, str | None] | None = None) -> AgentConfig:
    """Build the agent's configuration from /proc/cmdline text and CLI overrides.

    `overrides` maps the same keys (without `bootenv.`) to values; they replace what
    the command line says. A flag given without a value is on.
    """
    raw: dict[str, str | None] = {}
    for param, value in split_cmdline(text):
        if not param.startswith(PREFIX):
            continue
        key = param[len(PREFIX) :]
        if key not in KEYS:
            raise CmdlineError(
                f"unknown kernel parameter {shown(param)}",
                hint=f"known: {', '.join(PREFIX + k for k in KEYS)}",
            )
        if key in raw:
            raise CmdlineError(f"kernel parameter {param} is given twice")
        raw[key] = value
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise CmdlineError(f"unknown agent setting {shown(key)}")
        raw[key] = value
    return _build(raw)


def callback_of(text: str, overrides: Mapping[str, str | None] | None = None) -> str | None:
    """Where to report a command line that does not parse: its callback URL, when that
    one value is sound on its own (given once, printable ASCII, an http(s) URL)."""
    override = (overrides or {}).get("callback")
    values = [override] if override else [v for p, v in split_cmdline(text) if p == f"{PREFIX}callback"]
    if len(values) != 1 or not values[0] or not (values[0].isascii() and values[0].isprintable()):
        return None
    return values[0] if split_http_url(values[0]) is not None else None


def _build(raw: dict[str, str | None]) -> AgentConfig:
    for key, v in raw.items():
        # The command line is bytes (read with surrogateescape): a value that is not
        # printable ASCII would reach URLs, /etc/hostname and grub.cfg.
        if v is not None and not (v.isascii() and v.isprintable()):
            hint = "percent-encode it (%XX)" if key in ("image", "callback", "ssh_key") else None
            raise CmdlineError(f"{PREFIX}{key}={shown(v)} is not printable ASCII", hint=hint)

    def value(key: str) -> str | None:
        v = raw.get(key)
        if key in raw and not v and key not in FLAGS:
            raise CmdlineError(f"{PREFIX}{key} needs a value")
        return v

    image = value("image")
    if not image:
        raise CmdlineError(
            f"{PREFIX}image is missing", hint="add bootenv.image=URL to the kernel command line"
        )
    callback = value("callback")
    components = _components(value("components"))
    single = _flag(raw, "single")
    if single and components is not None:
        # The single image holds every component: a subset cannot be left out of it.
        raise CmdlineError(
            f"{PREFIX}single holds every component; {PREFIX}components must be all",
            hint=f"drop {PREFIX}single to lay out only some components",
        )
    return AgentConfig(
        image=_url(image, "image", allow_dir=True),
        components=components,
        disk=parse_disk(value("disk") or "auto"),
        callback=_url(callback, "callback") if callback else None,
        handoff=_choice(Handoff, value("handoff") or "kexec", "handoff"),
        hostname=check_hostname(value("hostname")),
        ssh_key=_ssh_key(value("ssh_key")),
        debug=_flag(raw, "debug"),
        shell=_flag(raw, "shell"),
        insecure=_flag(raw, "insecure"),
        trust=_trust(value("trust")),
        single=single,
    )


def shown(text: str) -> str:
    """`text` for a one-line message: undecodable bytes and control characters escaped."""
    return repr(text.encode("utf-8", "surrogateescape"))[2:-1]


def _url(text: str, key: str, *, allow_dir: bool = False) -> str:
    if split_http_url(text) is not None:
        return text
    if allow_dir and text.startswith("/"):
        return text  # a local directory: tests and images on the ramdisk itself
    raise CmdlineError(f"{PREFIX}{key}={text} is not an http(s) URL")


def _components(text: str | None) -> tuple[str, ...] | None:
    if text is None or text == "all":
        return None
    if text == "none":
        return ()
    names = tuple(text.split(","))
    for name in names:
        if not _NAME.fullmatch(name) or name in ("all", "none", "os"):
            raise CmdlineError(f"{PREFIX}components: {name!r} is not a component name")
    if len(set(names)) != len(names):
        raise CmdlineError(f"{PREFIX}components names a component twice")
    return names


def parse_disk(text: str) -> DiskSelector:
    if text == "auto":
        return DiskSelector()
    if text.startswith("/dev/") and len(text) > len("/dev/") and ".." not in text:
        return DiskSelector(DiskKind.DEVICE, text)
    kind, sep, rest = text.partition(":")
    if sep and rest and kind in ("serial", "path"):
        return DiskSelector(DiskKind(kind), rest)
    raise CmdlineError(f"{PREFIX}disk={text} is not auto, /dev/X, serial:S or path:P")


def _choice(enum: type[Handoff], text: str, key: str) -> Handoff:
    try:
        return enum(text)
    except ValueError:
        raise CmdlineError(f"{PREFIX}{key}={text} is not one of {', '.join(e.value for e in enum)}") from None


# /etc/hostname gets the name whole, FQDN or not, and systemd sets it with sethostname(2),
# which takes at most HOST_NAME_MAX (64) bytes: a longer name is ignored at boot.
HOSTNAME_MAX = 64


def check_hostname(text: str | None) -> str | None:
    """A host name as the agent takes it: dot-separated labels of letters, digits and
    inner hyphens, at most HOSTNAME_MAX characters in all. `assign` checks it with this
    too: a space in it would split it into more kernel arguments."""
    if text is None:
        return None
    labels = text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise CmdlineError(f"{PREFIX}hostname={shown(text)} is not a valid host name")
    if len(text) > HOSTNAME_MAX:
        raise CmdlineError(
            f"{PREFIX}hostname={text} is {len(text)} characters, over the kernel's {HOSTNAME_MAX} "
            "for a host name (a fully qualified one counts whole)",
        )
    return text


def _ssh_key(text: str | None) -> str | None:
    if text is None:
        return None
    key = unquote(text).strip()
    # The printable check in _build saw the text still percent-encoded: %0D, %00 or
    # %C3%A9 would reach authorized_keys as a control character or non-ASCII.
    if not (key.isascii() and key.isprintable()):
        raise CmdlineError(
            f"{PREFIX}ssh_key={shown(key)} is not printable ASCII once percent-decoded",
            hint="an SSH public key is one line of printable ASCII",
        )
    fields = key.split()
    if len(fields) < 2 or not fields[0].startswith(_KEY_TYPES) or "\n" in key:
        raise CmdlineError(
            f"{PREFIX}ssh_key is not one SSH public key",
            hint="URL-quote it: ssh_key=ssh-ed25519%20AAAA...%20me@host",
        )
    return key


def _flag(raw: dict[str, str | None], key: str) -> bool:
    if key not in raw:
        return False
    v = raw[key]
    if v is None or v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise CmdlineError(f"{PREFIX}{key}={v} is not a boolean (1/0, yes/no, true/false, on/off)")


def _trust(text: str | None) -> str | None:
    if text is None:
        return None
    fp = text.lower()
    if not _TRUST.fullmatch(fp):
        raise CmdlineError(f"{PREFIX}trust={text} is not a key fingerprint", hint="sha256:<64 hex digits>")
    return fp
