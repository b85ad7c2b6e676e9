"""Assign every path of the tree to exactly one sub-image, or exclude it on purpose.

The rules, in order (docs/FORMAT.md, "How a tree is split"):
1. a path the admin assigned to a component (`--component NAME=...,/PATH`; refused
   when it is, or holds, another sub-image's package's path, or dpkg's database);
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

Paths the packages, the scripts and the admin name are where the gold's own system finds
them: the tree's symlinks resolved inside it (a gold's /var -> /data/var puts dpkg's
/var/lib/dbdata at /data/var/lib/dbdata). A named path that is itself a symlink names
where it leads too (`claim_paths`): a data directory moved to /srv/dbdata and linked
from /var/lib/dbdata is the component's data all the same.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from bootenv import intree
from bootenv.dpkg import Database
from bootenv.errors import UserError
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

log = logging.getLogger(__name__)


@dataclass
class _Tree:
    """A symlink-aware view of the scanned paths."""

    links: dict[str, str] = field(default_factory=dict)

    def resolve(self, path: str, *, last: bool = True) -> str:
        """Resolve symlinks inside the tree, never leaving it (absolute links are rooted)."""
        return intree.resolve(path, self.links.get, last=last)


def links_of(entries: list[Entry]) -> dict[str, str]:
    """The scanned tree's symlinks: path -> target, as stored."""
    return {e.path: e.target for e in entries if e.kind is Kind.SYMLINK and e.target}


def claim_paths(claim: str, readlink: intree.Readlink) -> tuple[str, ...]:
    """Where a named path (an admin's `/PATH`, a path a maintainer script names) is in the
    tree: itself with its parents' symlinks resolved inside the tree; and, when it is
    itself a symlink, where that leads too (/var/lib/dbdata -> /srv/dbdata: the data is
    in /srv/dbdata)."""
    at = intree.resolve(claim, readlink, last=False)
    to = intree.resolve(claim, readlink)
    return (at,) if to == at else (at, to)


def plan_split(
    db: Database,
    specs: tuple[ComponentSpec, ...],
    entries: list[Entry],
    exclusions: Exclusions,
) -> Split:
    """The whole plan: package owners, component dependencies and each path's sub-image."""
    validate_specs(specs, db)
    package_owner, depends, base = assign_packages(db, specs)
    tree = _Tree(links_of(entries))
    check_claims(db, specs, package_owner, tree.links.get)
    # The rules name /var/log; a gold whose /var is a link to /data/var logs in /data/var/log.
    exclusions = exclusions.in_tree(tree.resolve)
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


def check_claims(
    db: Database,
    specs: tuple[ComponentSpec, ...],
    package_owner: Mapping[str, str],
    readlink: intree.Readlink,
) -> None:
    """Refuse an admin's `/PATH` that is, or holds, a path a package of another sub-image
    owns, or dpkg's database: rule 1 comes first, so it would take those files from the
    sub-image their package is in (dpkg itself into a component). Paths of the named
    component's own packages are its anyway. `readlink`: the tree's symlinks; paths are
    compared where they resolve inside the tree (dpkg records /lib/x where /lib ->
    usr/lib; a gold's /var may be a link to /data/var), the `/PATH`'s own link's target
    too (`claim_paths`)."""

    def canonical(path: str) -> str:
        return intree.resolve(path, readlink, last=False)

    # (where it is in the tree, the admin's /PATH, its component)
    claims = [
        (at, path, spec.name) for spec in specs for path in spec.paths for at in claim_paths(path, readlink)
    ]
    if not claims:
        return
    dpkg_dirs = sorted({posixpath.dirname(DPKG_STATUS), posixpath.dirname(canonical(DPKG_STATUS))})
    for at, claim, name in claims:
        for dpkg in dpkg_dirs:
            if _under(at, dpkg) or _under(dpkg, at):
                how = "is" if at == dpkg else "is in" if _under(at, dpkg) else "holds"
                raise UserError(
                    f"component {name}: {_named(claim, at)} {how} dpkg's database ({dpkg})",
                    hint="dpkg's files follow their packages: assign a path outside it",
                )
    first: dict[tuple[str, str], tuple[str, str, str]] = {}  # claim -> the first path (by name) it takes
    for pkg, paths in db.files.items():
        owner = package_owner[pkg]
        for path in paths:
            where = canonical(path)
            for at, _, name in claims:
                key = (at, name)
                if owner != name and _under(where, at) and (key not in first or where < first[key][0]):
                    first[key] = (where, pkg, owner)
    for at, claim, name in claims:
        if (at, name) in first:
            where, pkg, owner = first[(at, name)]
            held = "is" if where == at else f"holds {where}, which is"
            raise UserError(
                f"component {name}: {_named(claim, at)} {held} a path of package {pkg}, in "
                + ("the OS" if owner == OS else f"component {owner}"),
                hint="a /PATH assigns only paths no package outside the component owns; name one below it",
            )


def _named(claim: str, at: str) -> str:
    """An admin's `/PATH` in a message, with where it is in the tree if that differs."""
    return claim if at == claim else f"{claim} (at {at})"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _ancestors(path: str) -> Iterator[str]:
    """`path`'s ancestors, "/" included."""
    while path != "/":
        path = posixpath.dirname(path)
        yield path


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
        self.claims = sorted(
            ((at, s.name) for s in specs for p in s.paths for at in claim_paths(p, tree.links.get)),
            key=lambda c: -len(c[0]),
        )
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
        self.script_claims = _script_claims(db, package_owner, tree, owners)
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


def _script_claims(
    db: Database, package_owner: Mapping[str, str], tree: _Tree, owned: Collection[str]
) -> dict[str, str]:
    """Unowned paths named by exactly one component's maintainer scripts (rule 4), where
    they are in the tree (`owned`: the packages' paths, resolved as well). A named path
    that is a symlink names where it leads too, unless that holds packages' files (a
    link to /usr/lib would take every unowned file there): then only the link is named."""
    named: dict[str, set[str]] = {}
    holders: set[str] = set()  # the directories that hold packages' paths (made when needed)
    for pkg, paths in db.script_paths.items():
        for path in paths:
            if path.count("/") < 3:
                continue
            at, *to = claim_paths(path, tree.links.get)
            if at in owned:
                continue
            named.setdefault(at, set()).add(package_owner[pkg])
            if to and not holders:
                holders = {d for o in owned for d in _ancestors(o)}
            for target in to:
                if target in holders:
                    if package_owner[pkg] != OS:
                        log.warning(
                            "%s, named by %s's maintainer scripts, is a link to %s, which holds packages' "
                            "files: only the link goes with %s (name its data with --component %s=...,/PATH)",
                            path,
                            pkg,
                            target,
                            package_owner[pkg],
                            package_owner[pkg],
                        )
                    continue
                if target not in owned:  # an owned one is its package's (rule 3)
                    named.setdefault(target, set()).add(package_owner[pkg])
    return {p: next(iter(o)) for p, o in named.items() if len(o) == 1 and OS not in o}
