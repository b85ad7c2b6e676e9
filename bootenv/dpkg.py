"""Read a root tree's dpkg database: installed packages, their relations and their files.

Parsing is pure (text in, dataclasses out); `read_database` is the thin reader.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

from bootenv.errors import UserError
from bootenv.intree import disk_links, inside

STATUS = Path("var/lib/dpkg/status")
INFO = Path("var/lib/dpkg/info")
DIVERSIONS = Path("var/lib/dpkg/diversions")

_SCRIPT_PATH = re.compile(r"(?<![\w$}])(/(?:etc|var|srv|opt)(?:/[A-Za-z0-9._+@-]+)+)")
SCRIPTS = ("preinst", "postinst", "config")
_REL_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9+.\-]*)(?::[a-z0-9-]+)?")


@dataclass(frozen=True)
class Package:
    """One installed package as recorded in dpkg's status file. A `Multi-Arch: same`
    package installed for several architectures (libc6:amd64 and libc6:i386) is one
    Package: the split moves a package by name, so its instances go together."""

    name: str
    arch: str
    priority: str
    multi_arch: str
    depends: tuple[tuple[str, ...], ...]  # AND of OR-groups of package names
    provides: tuple[str, ...]
    recommends: tuple[tuple[str, ...], ...]
    stanza: str  # the exact status paragraph(s), for rewriting the database
    other_arches: tuple[str, ...] = ()  # further instances of a Multi-Arch: same package

    @property
    def info_prefix(self) -> str:
        """The file-name prefix of this package's files in /var/lib/dpkg/info."""
        return self.info_prefixes[0]

    @property
    def info_prefixes(self) -> tuple[str, ...]:
        """The prefixes of every instance's files in /var/lib/dpkg/info."""
        if self.multi_arch == "same":
            return tuple(f"{self.name}:{arch}" for arch in (self.arch, *self.other_arches))
        return (self.name,)


@dataclass(frozen=True)
class Database:
    """The installed packages of a tree and the paths each one owns."""

    packages: dict[str, Package]
    files: dict[str, tuple[str, ...]]  # package name -> absolute paths it owns
    other_stanzas: tuple[str, ...]  # status paragraphs of packages not installed
    script_paths: dict[str, frozenset[str]]  # package -> paths its maintainer scripts name


def version_key(version: str) -> list[tuple[int, str]]:
    """An order of kernel versions (6.1.0-9-amd64 before 6.1.0-10-amd64): numbers by
    value, words before numbers."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def parse_stanzas(text: str) -> list[str]:
    """Split a deb822 file into paragraphs, keeping each paragraph's exact text."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def parse_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def parse_relations(value: str) -> tuple[tuple[str, ...], ...]:
    """`a (>= 1) | b, c:any` -> (("a", "b"), ("c",)); versions and arches are dropped."""
    groups: list[tuple[str, ...]] = []
    for group in value.split(","):
        names = []
        for alt in group.split("|"):
            m = _REL_NAME.match(alt)
            if m:
                names.append(m.group(1))
        if names:
            groups.append(tuple(names))
    return tuple(groups)


def parse_status(text: str) -> tuple[dict[str, Package], tuple[str, ...]]:
    """Return the installed packages and the paragraphs of everything else."""
    installed: dict[str, Package] = {}
    others: list[str] = []
    for stanza in parse_stanzas(text):
        f = parse_fields(stanza)
        name = f.get("package", "")
        if not name:
            raise UserError("dpkg status has a paragraph without a Package field")
        if f.get("status", "").split()[-1:] != ["installed"]:
            others.append(stanza)
            continue
        depends = parse_relations(f.get("pre-depends", "")) + parse_relations(f.get("depends", ""))
        provides = tuple(g[0] for g in parse_relations(f.get("provides", "")))
        pkg = Package(
            name=name,
            arch=f.get("architecture", "all"),
            priority=f.get("priority", "optional"),
            multi_arch=f.get("multi-arch", "no"),
            depends=depends,
            provides=provides,
            recommends=parse_relations(f.get("recommends", "")),
            stanza=stanza,
        )
        first = installed.get(name)
        installed[name] = pkg if first is None else _another_arch(first, pkg)
    return installed, tuple(others)


def _another_arch(first: Package, more: Package) -> Package:
    """Fold a second installed instance of a package into the first."""
    arches = (first.arch, *first.other_arches)
    if first.multi_arch != "same" or more.multi_arch != "same" or more.arch in arches:
        raise UserError(
            f"dpkg status lists {first.name} as installed twice",
            hint="only a Multi-Arch: same package may be, once per architecture",
        )

    def union(a: tuple[tuple[str, ...], ...], b: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        return a + tuple(g for g in b if g not in a)

    return replace(
        first,
        other_arches=(*first.other_arches, more.arch),
        depends=union(first.depends, more.depends),
        provides=first.provides + tuple(p for p in more.provides if p not in first.provides),
        recommends=union(first.recommends, more.recommends),
        stanza=first.stanza + "\n\n" + more.stanza,
    )


def read_database(root: Path) -> Database:
    """Read the dpkg database of the tree at `root`, its symlinks resolved inside it (a
    gold's /var may be a link to /data/var: its database is the tree's, not the host's)."""
    links = disk_links(root)
    status = inside(root, STATUS, links)
    if not status.is_file():
        raise UserError(
            f"{root} has no dpkg database ({STATUS} is missing)",
            hint="ROOT must be the root of a Debian-family system",
        )
    packages, others = parse_status(status.read_bytes().decode("utf-8", "surrogateescape"))
    files: dict[str, tuple[str, ...]] = {}
    scripts: dict[str, frozenset[str]] = {}
    for pkg in packages.values():
        found: set[str] = set()
        owned: dict[str, None] = {}  # ordered; instances of several arches share paths
        for prefix in pkg.info_prefixes:
            for kind in SCRIPTS:
                with contextlib.suppress(FileNotFoundError):
                    found |= parse_script_paths(inside(root, INFO / f"{prefix}.{kind}", links).read_bytes())
            try:
                lines = (
                    inside(root, INFO / f"{prefix}.list", links)
                    .read_bytes()
                    .decode("utf-8", "surrogateescape")
                    .splitlines()
                )
            except FileNotFoundError:
                lines = []
            owned.update((line, None) for line in lines if line.startswith("/") and line != "/.")
        scripts[pkg.name] = frozenset(found)
        files[pkg.name] = tuple(owned)
    return Database(packages=packages, files=files, other_stanzas=others, script_paths=scripts)


@dataclass(frozen=True)
class Diversion:
    """`dpkg-divert`: other packages' `path` is installed as `to`, and `package` (None for
    a local diversion) ships its own `path`."""

    path: str
    to: str
    package: str | None


def parse_diversions(text: str) -> tuple[Diversion, ...]:
    """dpkg's diversions file: three lines per diversion (from, to, package; ":" local)."""
    lines = text.splitlines()
    if len(lines) % 3:
        raise UserError(f"{DIVERSIONS} is damaged: {len(lines)} lines, not a multiple of 3")
    triples = (lines[i : i + 3] for i in range(0, len(lines), 3))
    return tuple(Diversion(a, b, None if c == ":" else c) for a, b, c in triples)


def read_diversions(root: Path) -> tuple[Diversion, ...]:
    try:
        return parse_diversions(inside(root, DIVERSIONS).read_bytes().decode("utf-8", "surrogateescape"))
    except FileNotFoundError:
        return ()


def parse_script_paths(script: bytes) -> set[str]:
    """Literal absolute paths under /etc, /var, /srv or /opt that a maintainer script names."""
    text = script.decode(errors="replace")
    return {m.group(1).rstrip(".") for m in _SCRIPT_PATH.finditer(text)}


def render_status(stanzas: list[str]) -> str:
    """Join status paragraphs back into a dpkg status file."""
    return "".join(s + "\n\n" for s in stanzas)
