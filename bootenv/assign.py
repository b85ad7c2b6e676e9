"""Assign every path of the tree to exactly one sub-image, or exclude it on purpose.

The rules, in order (docs/FORMAT.md, "How a tree is split"):
1. a path the admin assigned to a component (`--component NAME=...,/PATH`);
2. dpkg's own files: status is rewritten per sub-image, info files follow their
   package, /var/lib/dpkg/alternatives/X follows /etc/alternatives/X;
3. a path owned by packages: the OS if any owner is an OS package, the component if
   one component owns it, the OS if several components do;
4. an unowned path (3 or more levels deep, e.g. /var/lib/mysql) that the maintainer
   scripts of exactly one component's packages name, and no OS package's do: that
   component, with everything below it (data and config made by postinst);
5. an unowned symlink whose target resolves to a component's path: that component
   (systemd enablement links, /etc/alternatives, a2enmod links);
6. anything else: the sub-image of its parent directory.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

from bootenv import intree
from bootenv.dpkg import Database
from bootenv.exclude import Exclusions
from bootenv.split import (
    ALTERNATIVES_DB,
    DPKG_INFO,
    DPKG_STATUS,
    OS,
    ComponentSpec,
    Split,
    assign_packages,
    pick_owner,
    validate_specs,
)
from bootenv.walk import Entry, Kind


@dataclass
class _Tree:
    """A symlink-aware view of the scanned paths."""

    links: dict[str, str] = field(default_factory=dict)

    def resolve(self, path: str, *, last: bool = True) -> str:
        """Resolve symlinks inside the tree, never leaving it (absolute links are rooted)."""
        return intree.resolve(path, self.links.get, last=last)


def plan_split(
    db: Database,
    specs: tuple[ComponentSpec, ...],
    entries: list[Entry],
    exclusions: Exclusions,
) -> Split:
    """The whole plan: package owners, component dependencies and each path's sub-image."""
    validate_specs(specs, db)
    package_owner, depends, base = assign_packages(db, specs)
    tree = _Tree({e.path: e.target for e in entries if e.kind is Kind.SYMLINK and e.target})
    decider = _Decider(db, specs, package_owner, depends, tree)
    files: dict[str, list[str]] = {OS: [], **{s.name: [] for s in specs}}
    dirs: dict[str, set[str]] = {OS: set(), **{s.name: set() for s in specs}}
    excluded: list[tuple[str, str]] = []
    for entry in entries:
        is_dir = entry.kind is Kind.DIR
        reason = exclusions.reason(entry.path, is_dir)
        if reason is None and entry.kind is Kind.SOCKET:
            reason = "socket"
        if reason is not None:
            excluded.append((entry.path, reason))
            continue
        image = decider.image(entry.path)
        if is_dir:
            dirs[image].add(entry.path)
        else:
            files[image].append(entry.path)
            _add_ancestors(dirs[image], entry.path)
    for image in list(dirs):
        for d in list(dirs[image]):
            _add_ancestors(dirs[image], d)
        dirs[image].add("/")
    return Split(
        package_owner=package_owner,
        depends=depends,
        files={k: tuple(v) for k, v in files.items()},
        dirs={k: tuple(sorted(v)) for k, v in dirs.items()},
        excluded=tuple(excluded),
        base=base,
    )


def _add_ancestors(dirs: set[str], path: str) -> None:
    """Add `path`'s ancestors (not "/") to `dirs`, up to the first one already there: that
    one's own ancestors are added when it is (or was) added itself."""
    parent = posixpath.dirname(path)
    while parent != "/" and parent not in dirs:
        dirs.add(parent)
        parent = posixpath.dirname(parent)


class _Decider:
    def __init__(
        self,
        db: Database,
        specs: tuple[ComponentSpec, ...],
        package_owner: Mapping[str, str],
        depends: Mapping[str, tuple[str, ...]],
        tree: _Tree,
    ) -> None:
        self.tree = tree
        self.depends = depends
        self.claims = sorted(((p, s.name) for s in specs for p in s.paths), key=lambda c: -len(c[0]))
        self.script_claims = _script_claims(db, package_owner)
        self.info_owner = {
            prefix: package_owner[pkg.name] for pkg in db.packages.values() for prefix in pkg.info_prefixes
        }
        owners: dict[str, set[str]] = {}
        for pkg, paths in db.files.items():
            for path in paths:
                # dpkg records /lib/x even where /lib is a symlink to usr/lib (merged /usr).
                canonical = tree.resolve(path, last=False)
                owners.setdefault(canonical, set()).add(package_owner[pkg])
        self.owners = owners
        self.memo: dict[str, str] = {"/": OS}
        # dpkg's database where the scan found it: a gold's /var may be a symlink.
        self.status = tree.resolve(DPKG_STATUS)
        self.info = tree.resolve(DPKG_INFO) + "/"
        self.alternatives = tree.resolve(ALTERNATIVES_DB) + "/"

    def image(self, path: str) -> str:
        found = self.memo.get(path)
        if found is None:
            decided = self._decide(path)
            self.memo[path] = decided
            return decided
        return found

    def _decide(self, path: str) -> str:
        for claim, name in self.claims:
            if path == claim or path.startswith(claim + "/"):
                return name
        if path == self.status:
            return OS
        if path.startswith(self.info):
            prefix = posixpath.basename(path).rsplit(".", 1)[0]
            return self.info_owner.get(prefix, OS)
        if path.startswith(self.alternatives):
            return self.image("/etc/alternatives/" + path[len(self.alternatives) :])
        owners = self.owners.get(path)
        if owners:
            if OS in owners:
                return OS
            # Shipped by several components (/etc/apache2 by apache2 and by php's
            # module): the one the others depend on, as for a package (rule 5).
            return pick_owner(sorted(owners), self.depends)
        script_claim = self.script_claims.get(path)
        if script_claim is not None:
            return script_claim
        if path in self.tree.links:
            target = self.tree.resolve(path)
            if target != path and target not in self.tree.links:
                image = self.image(target)
                if image != OS:
                    return image
        return self.image(posixpath.dirname(path))


def _script_claims(db: Database, package_owner: Mapping[str, str]) -> dict[str, str]:
    """Unowned paths named by exactly one component's maintainer scripts (rule 4)."""
    owned = {p for paths in db.files.values() for p in paths}
    named: dict[str, set[str]] = {}
    for pkg, paths in db.script_paths.items():
        for path in paths:
            if path.count("/") >= 3 and path not in owned:
                named.setdefault(path, set()).add(package_owner[pkg])
    return {p: next(iter(o)) for p, o in named.items() if len(o) == 1 and OS not in o}
