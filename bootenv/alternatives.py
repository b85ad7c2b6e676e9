"""Debian alternatives whose candidates a split puts in more than one sub-image.

update-alternatives keeps a group NAME in two places: the link /etc/alternatives/NAME
(and one per slave) to the selected candidate, and the database entry
/var/lib/dpkg/alternatives/NAME listing every candidate with its priority and slave
paths. The split gives the link to the sub-image of its target (assign.py, rule 5) and
the entry to the link's, so a group whose selected candidate is a component's (gawk in
a component, mawk in the OS) would leave an OS-only target with no /etc/alternatives/awk
and no entry: /usr/bin/awk dangling, mawk forgotten.

A **shared** group has candidates in the OS and in a component. Its entry, its
/etc/alternatives links and its generic links (/usr/bin/awk -> /etc/alternatives/awk)
go to the OS, written as the OS alone would have them (`select` of the OS's
candidates); for each component with candidates in it, the OS image records the gold's
entry, selection and that component's own candidates (`Fragment`, in
/var/lib/bootenv/alternatives/<component>), and a layout of the component adds them
(altmerge.py). The view of
any set of the gold's candidates is one function of that set, so the OS's, every
layout's in between, and the gold's (all candidates) agree, whatever the order the
components come in. A view is the entry as update-alternatives saves it (a slave none
of its candidates has is dropped), and a target's entry is compared with one by what it
means (`meaning`): a package's script runs update-alternatives at each upgrade, which
writes the entry again. A target's entry that means none of them is the admin's; but a
candidate the gold does not list (apt installed it there) is kept in every view.

Pure: the database format (`man update-alternatives`, ADMINISTRATIVE DIRECTORY), the
selection, and the capture's plan over a Split.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from bootenv.intree import resolve
from bootenv.split import OS, Split

ADMIN_DIR = "/etc/alternatives"
DB_DIR = "/var/lib/dpkg/alternatives"
MODES = ("auto", "manual")


class FormatError(ValueError):
    """A database entry update-alternatives would not read."""


@dataclass(frozen=True)
class Choice:
    path: str
    priority: int
    slaves: tuple[str, ...]  # one per slave of the group, "" where it has none


@dataclass(frozen=True)
class Group:
    name: str
    mode: str  # auto or manual
    link: str  # the generic link: /usr/bin/awk
    slaves: tuple[tuple[str, str], ...]  # (name, generic link)
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class View:
    """A group as update-alternatives leaves it with some of its candidates: the entry,
    and the candidate its links point at."""

    group: Group
    selected: Choice


def _name_ok(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\n" not in name


def _path_ok(path: str) -> bool:
    return path.startswith("/") and posixpath.normpath(path) == path and path != "/"


def parse(name: str, text: str) -> Group:
    """The entry of group `name`. FormatError if update-alternatives would refuse it."""
    if not _name_ok(name):
        raise FormatError(f"bad alternative name {name!r}")
    if not text.endswith("\n"):
        raise FormatError(f"{name}: entry does not end with a newline")
    lines = text[:-1].split("\n")
    lines.reverse()

    def take(what: str) -> str:
        if not lines:
            raise FormatError(f"{name}: entry ends before its {what}")
        return lines.pop()

    mode = take("mode")
    if mode not in MODES:
        raise FormatError(f"{name}: mode {mode!r} is not auto or manual")
    link = take("link")
    slaves: list[tuple[str, str]] = []
    while (slave := take("slaves' end")) != "":
        slaves.append((slave, take(f"slave {slave}'s link")))
    choices: list[Choice] = []
    while (path := take("end")) != "":
        try:
            priority = int(take(f"{path}'s priority"))
        except ValueError as exc:
            raise FormatError(f"{name}: {path}'s priority is not a number") from exc
        choices.append(Choice(path, priority, tuple(take(f"{path}'s slave {s}") for s, _ in slaves)))
    if lines:
        raise FormatError(f"{name}: lines after the entry's end")
    group = Group(name, mode, link, tuple(slaves), tuple(choices))
    _check(group)
    return group


def _check(group: Group) -> None:
    links = [group.link, *(link for _, link in group.slaves)]
    names = [group.name, *(s for s, _ in group.slaves)]
    paths = [c.path for c in group.choices]
    if not all(map(_path_ok, links)) or not all(map(_name_ok, names)):
        raise FormatError(f"{group.name}: a link that is not an absolute path, or a bad slave name")
    if not all(map(_path_ok, paths)) or not all(_path_ok(p) for c in group.choices for p in c.slaves if p):
        raise FormatError(f"{group.name}: a candidate path that is not absolute")
    if len(set(links)) < len(links) or len(set(names)) < len(names) or len(set(paths)) < len(paths):
        raise FormatError(f"{group.name}: a link, a name or a candidate listed twice")


def render(group: Group) -> str:
    """The entry as update-alternatives writes it (parse's inverse)."""
    out = [group.mode, group.link]
    for slave, link in group.slaves:
        out += [slave, link]
    out.append("")
    for c in group.choices:
        out += [c.path, str(c.priority), *c.slaves]
    out.append("")
    return "\n".join(out) + "\n"


def select(gold: Group, present: Collection[str], selected: str, kept: Group | None = None) -> View | None:
    """The group with the gold's candidates in `present`, in the gold's order, then those
    of `kept` (a target's entry) the gold does not list, with their slaves (apt installed
    them there), as update-alternatives saves it: a slave no candidate has is dropped. In
    manual mode on the gold's `selected` if it is one of them, else in auto mode on the
    first of the highest priority (update-alternatives' choice). None without any."""
    known = {c.path for c in gold.choices}
    slaves = list(gold.slaves)
    pairs = [(c, _slave_map(gold, c)) for c in gold.choices if c.path in present]
    if kept is not None:
        names = {gold.name, *(s for s, _ in slaves)}
        slaves += [s for s in kept.slaves if s[0] not in names]
        pairs += [(c, _slave_map(kept, c)) for c in kept.choices if c.path not in known]
    if not pairs:
        return None
    used = tuple(s for s in slaves if any(m.get(s[0]) for _, m in pairs))
    choices = tuple(Choice(c.path, c.priority, tuple(m.get(s, "") for s, _ in used)) for c, m in pairs)
    manual = next((c for c in choices if c.path == selected), None) if gold.mode == "manual" else None
    best = manual or max(choices, key=lambda c: c.priority)  # max keeps the first of equals
    group = replace(gold, mode="manual" if manual else "auto", slaves=used, choices=choices)
    return View(group, best)


def _slave_map(group: Group, choice: Choice) -> dict[str, str]:
    return {s: p for (s, _), p in zip(group.slaves, choice.slaves, strict=True) if p}


def meaning(group: Group) -> tuple[object, ...]:
    """What update-alternatives reads in an entry: its mode, its links, and each
    candidate's priority and slaves; not their order, nor a slave no candidate has
    (which it drops whenever it writes the entry)."""
    choices = {c.path: (c.priority, _slave_map(group, c)) for c in group.choices}
    used = {s for _, m in choices.values() for s in m}
    return (group.mode, group.link, {s: link for s, link in group.slaves if s in used}, choices)


def links(gold: Group, view: View | None) -> dict[str, str | None]:
    """Every link the group owns -> its target under `view` (None: no such link): the
    generic links and /etc/alternatives' own, for the master and each slave of the gold
    or the view, in order. A slave the view lacks has no links: they are removed."""
    slaves = [*gold.slaves, *(s for s in (view.group.slaves if view else ()) if s not in gold.slaves)]
    chosen = _slave_map(view.group, view.selected) if view else {}
    names = [(gold.name, gold.link, view.selected.path if view else "")]
    names += [(slave, link, chosen.get(slave, "")) for slave, link in slaves]
    out: dict[str, str | None] = {}
    for name, link, target in names:
        admin = f"{ADMIN_DIR}/{name}"
        out[link] = admin if target else None
        out[admin] = target or None
    return out


@dataclass(frozen=True)
class Fragment:
    """What the OS image records for one component of a shared group: the gold's entry,
    the gold's selection (the link's target: a manual mode's choice is nowhere else) and
    the component's own candidates."""

    entry: str
    selected: str
    ours: tuple[str, ...]

    def gold(self, name: str) -> Group:
        return parse(name, self.entry)


def dump_fragments(groups: Mapping[str, Fragment]) -> bytes:
    data = {n: {"entry": f.entry, "selected": f.selected, "ours": list(f.ours)} for n, f in groups.items()}
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def load_fragments(data: bytes) -> dict[str, Fragment]:
    """FormatError if it is not what dump_fragments writes."""
    try:
        raw = json.loads(data)
        out = {
            name: Fragment(str(f["entry"]), str(f["selected"]), tuple(str(p) for p in f["ours"]))
            for name, f in raw.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FormatError(f"damaged alternatives record: {exc}") from exc
    for name, f in out.items():
        f.gold(name)  # refused here if it does not parse
    return out


@dataclass(frozen=True)
class Shared:
    """A group with candidates in the OS and in components, as capture plans it."""

    gold: Group
    selected: str  # the gold's /etc/alternatives/NAME target
    owners: Mapping[str, str]  # candidate path -> sub-image (only those in one)
    moved: tuple[str, ...]  # its paths the split gave a component, now the OS's

    def os_view(self) -> View | None:
        return select(self.gold, {p for p, i in self.owners.items() if i == OS}, self.selected)

    def fragment(self, component: str) -> Fragment:
        ours = tuple(p for p, i in self.owners.items() if i == component)
        return Fragment(render(self.gold), self.selected, ours)


def plan_shared(
    split: Split, groups: Mapping[str, Group], readlink: Callable[[str], str | None], db_dir: str
) -> tuple[Split, tuple[Shared, ...]]:
    """The shared groups among the gold's (`groups`, parsed from its database in `db_dir`,
    where the tree's links put it), and the split with their paths in the OS: the entry,
    the /etc/alternatives links and the generic links to them (the split's paths are
    where the tree's links put them; `readlink`: the tree's). A group with no candidate in
    the OS, or none elsewhere, is left as the split has it."""

    def at(path: str) -> str:
        return resolve(path, readlink, last=False)

    image: dict[str, str] = {}
    for name, paths in split.files.items():
        image.update(dict.fromkeys(paths, name))
    shared: list[Shared] = []
    moves: dict[str, str] = {}  # path -> the image it leaves
    for name in sorted(groups):
        gold = groups[name]
        owners = {c.path: image[at(c.path)] for c in gold.choices if at(c.path) in image}
        if OS not in owners.values() or set(owners.values()) == {OS}:
            continue
        selected = readlink(at(f"{ADMIN_DIR}/{name}")) or ""
        mine = [at(f"{db_dir}/{name}")]
        for each, link in ((name, gold.link), *gold.slaves):
            admin = f"{ADMIN_DIR}/{each}"
            mine.append(at(admin))
            if readlink(at(link)) == admin:  # the generic link; not a package's own file
                mine.append(at(link))
        moved = tuple(p for p in mine if image.get(p, OS) != OS)
        moves.update((p, image[p]) for p in moved)
        shared.append(Shared(gold, selected, owners, moved))
    if not moves:
        return split, tuple(shared)
    files = {n: tuple(p for p in paths if p not in moves) for n, paths in split.files.items()}
    files[OS] += tuple(sorted(moves))
    dirs = set(split.dirs[OS])
    for path in moves:
        while (path := posixpath.dirname(path)) not in dirs:
            dirs.add(path)
    return replace(split, files=files, dirs={**split.dirs, OS: tuple(sorted(dirs))}), tuple(shared)
