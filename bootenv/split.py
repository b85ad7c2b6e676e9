"""Plan the component split: which packages and which files go into which sub-image.

Pure planning: a dpkg Database, component seeds and a scanned tree in, a frozen Split
out. The rules are documented in docs/FORMAT.md ("How a tree is split").
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from bootenv.dpkg import INFO, STATUS, Database, Package
from bootenv.errors import UserError

OS = "os"
BASE_PRIORITIES = ("required", "important", "standard")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED = (OS, "all", "none")
DPKG_STATUS = "/" + str(STATUS)
DPKG_INFO = "/" + str(INFO) + "/"
ALTERNATIVES_DB = "/var/lib/dpkg/alternatives/"
COMPONENT_STATUS_DIR = "/var/lib/bootenv/dpkg"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    packages: tuple[str, ...]
    paths: tuple[str, ...] = ()  # paths the admin assigns to it; no other sub-image's package owns any


@dataclass(frozen=True)
class Split:
    package_owner: Mapping[str, str]  # package -> OS or a component name
    depends: Mapping[str, tuple[str, ...]]  # component -> components it needs
    files: Mapping[str, tuple[str, ...]]  # sub-image -> non-directory paths
    dirs: Mapping[str, tuple[str, ...]]  # sub-image -> directories it carries
    excluded: tuple[tuple[str, str], ...]  # (path, reason)
    base: frozenset[str]

    def packages(self, image: str) -> tuple[str, ...]:
        return tuple(sorted(p for p, o in self.package_owner.items() if o == image))

    def image_of(self, path: str) -> str | None:
        for image, paths in self.files.items():
            if path in paths:
                return image
        return None


def parse_component_arg(arg: str) -> ComponentSpec:
    """`NAME=PKG[,PKG|/PATH...]` from the command line."""
    name, sep, rest = arg.partition("=")
    name = name.strip()
    items = [i.strip() for i in rest.split(",") if i.strip()]
    if not sep or not items:
        raise UserError(f"bad --component {arg!r}", hint="use NAME=PKG[,PKG...]")
    pkgs = tuple(i for i in items if not i.startswith("/"))
    paths = tuple(posixpath.normpath(i) for i in items if i.startswith("/"))
    return ComponentSpec(name, pkgs, paths)


def validate_specs(specs: Iterable[ComponentSpec], db: Database) -> None:
    """Reject bad names, unknown packages and packages claimed twice, before any write."""
    base = base_packages(db)
    claimed: dict[str, str] = {}
    for spec in specs:
        if not _NAME.fullmatch(spec.name) or spec.name in RESERVED:
            raise UserError(
                f"invalid component name {spec.name!r}",
                hint="use lowercase letters, digits, - and _; not os, all or none",
            )
        if not spec.packages:
            raise UserError(f"component {spec.name} names no package")
        for pkg in spec.packages:
            if pkg not in db.packages:
                near = difflib.get_close_matches(pkg, list(db.packages), n=3)
                hint = f"did you mean {', '.join(near)}?" if near else None
                raise UserError(f"package {pkg!r} (component {spec.name}) is not installed", hint=hint)
            if pkg in base:
                raise UserError(
                    f"package {pkg} (component {spec.name}) is part of the base OS",
                    hint="the base OS is priority required/important/standard and its dependencies",
                )
            if pkg in claimed and claimed[pkg] != spec.name:
                raise UserError(f"package {pkg} is claimed by both {claimed[pkg]} and {spec.name}")
            claimed[pkg] = spec.name
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"component {sorted(dup)[0]} is given twice")


class Resolver:
    """Follows Depends/Pre-Depends through installed packages and virtual names."""

    def __init__(self, packages: Mapping[str, Package]) -> None:
        self.packages = packages
        self.providers: dict[str, list[str]] = {}
        for pkg in sorted(packages):
            for virtual in packages[pkg].provides:
                self.providers.setdefault(virtual, []).append(pkg)

    def satisfier(self, group: tuple[str, ...]) -> str | None:
        """The installed package that satisfies an OR-group: first alternative wins."""
        for alt in group:
            if alt in self.packages:
                return alt
            if alt in self.providers:
                return self.providers[alt][0]
        return None

    def closure(self, seeds: Iterable[str], stop: frozenset[str] = frozenset()) -> dict[str, int]:
        """Packages reachable from `seeds` with their BFS depth, not entering `stop`."""
        depth: dict[str, int] = {}
        queue: deque[str] = deque()
        for seed in sorted(set(seeds)):
            if seed not in stop:
                depth[seed] = 0
                queue.append(seed)
        while queue:
            pkg = queue.popleft()
            for group in self.packages[pkg].depends:
                dep = self.satisfier(group)
                if dep is None or dep in stop or dep in depth:
                    continue
                depth[dep] = depth[pkg] + 1
                queue.append(dep)
        return depth


def base_packages(db: Database) -> frozenset[str]:
    """Priority required/important/standard packages and everything they depend on."""
    resolver = Resolver(db.packages)
    seeds = [p.name for p in db.packages.values() if p.priority in BASE_PRIORITIES]
    return frozenset(resolver.closure(seeds))


def assign_packages(
    db: Database, specs: tuple[ComponentSpec, ...]
) -> tuple[dict[str, str], dict[str, tuple[str, ...]], frozenset[str]]:
    """Give every installed package one owner; derive component dependencies.

    1. The OS is the base (priority required/important/standard and its closure), plus
       every package no component needs, plus everything those depend on.
    2. A component is its packages plus their Depends/Pre-Depends closure outside the OS.
    3. Component A depends on component B when A's packages depend on or recommend one
       of B's named packages. A cycle is an error.
    4. A package in the closures of two components goes to the one the other depends on;
       if neither depends on the other it goes to the OS, so each stays independent.
    5. A package no component needs but which depends on or recommends a component's
       named packages (an add-on, e.g. a module) joins that component (first by name).
    """
    base = base_packages(db)
    resolver = Resolver(db.packages)
    seeds = {s.name: set(s.packages) for s in specs}
    seed_owner = {p: s.name for s in specs for p in s.packages}
    os_pkgs = set(base)
    while True:
        stop = frozenset(os_pkgs)
        closures = {n: _closure_of(resolver, n, seeds, seed_owner, stop) for n in sorted(seeds)}
        claimed = set().union(*closures.values()) if closures else set()
        leftover = set(db.packages) - os_pkgs - claimed
        if not leftover:
            break
        moved = False
        for pkg in sorted(leftover):
            reach = set(resolver.closure([pkg], stop=stop))
            for group in db.packages[pkg].recommends:
                rec = resolver.satisfier(group)
                if rec is not None:
                    reach.add(rec)
            hit = sorted({seed_owner[p] for p in reach if p in seed_owner})
            if hit:
                seeds[hit[0]].add(pkg)
                seed_owner[pkg] = hit[0]
                moved = True
        if not moved:
            os_pkgs |= set(resolver.closure(leftover, stop=frozenset(seed_owner)))
    depends = _component_depends(db, resolver, seeds, seed_owner, closures)
    owner: dict[str, str] = {}
    for pkg in sorted(claimed):
        who = [n for n, c in closures.items() if pkg in c]
        owner[pkg] = pick_owner(who, depends)
    package_owner = {p: owner.get(p, OS) for p in db.packages}
    return package_owner, {n: tuple(sorted(d)) for n, d in depends.items()}, base


def _closure_of(
    resolver: Resolver,
    name: str,
    seeds: Mapping[str, set[str]],
    seed_owner: Mapping[str, str],
    stop: frozenset[str],
) -> set[str]:
    others = frozenset(p for p, o in seed_owner.items() if o != name)
    return set(resolver.closure(seeds[name], stop=stop | others))


def _component_depends(
    db: Database,
    resolver: Resolver,
    seeds: Mapping[str, set[str]],
    seed_owner: Mapping[str, str],
    closures: Mapping[str, set[str]],
) -> dict[str, set[str]]:
    direct: dict[str, set[str]] = {n: set() for n in seeds}
    for name, closure in closures.items():
        for pkg in closure:
            p = db.packages[pkg]
            for group in p.depends + p.recommends:
                dep = resolver.satisfier(group)
                if dep is not None and dep in seed_owner and seed_owner[dep] != name:
                    direct[name].add(seed_owner[dep])
    cycle = _find_cycle({a: {b: set() for b in bs} for a, bs in direct.items()})
    if cycle:
        raise UserError(
            f"components {' and '.join(cycle)} depend on each other",
            hint="merge them into one component",
        )
    full: dict[str, set[str]] = {}

    def walk(name: str) -> set[str]:
        if name not in full:
            full[name] = set(direct[name])
            for dep in direct[name]:
                full[name] |= walk(dep)
        return full[name]

    for name in direct:
        walk(name)
    return full


def pick_owner(who: list[str], depends: Mapping[str, Collection[str]]) -> str:
    """Of several claimants (packages' or paths'), the component every other depends on;
    the OS if there is none."""
    if len(who) == 1:
        return who[0]
    # The component every other claimant depends on owns it.
    for cand in sorted(who):
        if all(cand == other or cand in depends[other] for other in who):
            return cand
    return OS


def _find_cycle(edges: Mapping[str, Mapping[str, set[str]]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []
