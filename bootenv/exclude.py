"""What capture leaves out on purpose: runtime state, machine identity, logs, caches.

Patterns are shell globs on absolute paths where `*` also matches `/`. A rule that is
`files_only` keeps the directories (with their owners and modes, which services need,
e.g. /var/log/apache2) and drops everything else below them. An admin's `--exclude`
pattern leaves out what it matches and everything below it: `--exclude /root/.ssh`
leaves out the directory's files too, not only the directory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase, translate
from functools import cached_property
from glob import escape


@dataclass(frozen=True)
class Rule:
    pattern: str
    reason: str
    files_only: bool = False

    def matches(self, path: str, is_dir: bool) -> bool:
        if self.files_only and is_dir:
            return False
        return fnmatchcase(path, self.pattern)


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("/proc/*", "runtime state"),
    Rule("/sys/*", "runtime state"),
    Rule("/dev/*", "runtime state"),
    Rule("/run/*", "runtime state"),
    Rule("/tmp/*", "runtime state"),
    Rule("/var/tmp/*", "runtime state"),
    Rule("/var/run/*", "runtime state"),
    Rule("/var/lock/*", "runtime state"),
    Rule("/lost+found/*", "fsck leftovers"),
    Rule("/swapfile", "swap"),
    Rule("/etc/machine-id", "machine identity"),
    Rule("/var/lib/dbus/machine-id", "machine identity"),
    Rule("/etc/ssh/ssh_host_*", "machine identity"),
    Rule("/var/lib/systemd/random-seed", "machine identity"),
    Rule("/var/lib/systemd/credential.secret", "machine identity"),
    Rule("/var/lib/dhcp/*.leases", "machine identity"),
    Rule("/var/lib/systemd/network/*", "machine identity"),
    Rule("/var/log/*", "logs", files_only=True),
    Rule("/var/cache/apt/*", "apt cache", files_only=True),
    Rule("/var/lib/apt/lists/*", "apt cache", files_only=True),
    Rule("/var/cache/debconf/*-old", "backup"),
    Rule("/var/lib/dpkg/*-old", "backup"),
    Rule("/etc/*.dpkg-old", "backup"),
    Rule("/var/backups/*", "backup", files_only=True),
    # A machine bootenv provisioned: its layout journals, conflict records, the status
    # files of the components it was given, its first-boot hand-off and runtime. A gold
    # made from it gets its own at its next provisioning; carried over, they would
    # describe the wrong machine (a stale component status would win the dpkg merge).
    Rule("/var/lib/bootenv/*", "bootenv's own state"),
    Rule("/etc/bootenv/layout.json*", "bootenv's own state"),
    Rule("/opt/bootenv/*", "bootenv's own state"),
)


@dataclass(frozen=True)
class Exclusions:
    rules: tuple[Rule, ...] = DEFAULT_RULES

    def with_patterns(self, patterns: tuple[str, ...]) -> Exclusions:
        extra = tuple(
            Rule(q, "excluded by --exclude") for p in patterns for q in (p, p.rstrip("/") + "/*") if q != "/*"
        )
        return Exclusions(self.rules + extra)

    def in_tree(self, resolve: Callable[[str], str]) -> Exclusions:
        """These rules for a tree whose symlinks move a rule's directory: each rule also
        matches, right after itself, where `resolve` (a path with the tree's links
        resolved inside it) puts the directory its glob lies in."""
        rules = []
        for rule in self.rules:
            rules.append(rule)
            moved = _moved(rule.pattern, resolve)
            if moved is not None:
                rules.append(replace(rule, pattern=moved))
        return Exclusions(tuple(rules))

    def reason(self, path: str, is_dir: bool) -> str | None:
        """The reason `path` is left out, or None if it is captured (the first rule that
        matches, as `Rule.matches` says, in one regex match: capture asks for every path)."""
        m = (self._dir_regex if is_dir else self._regex).match(path)
        return None if m is None or m.lastgroup is None else self.rules[int(m.lastgroup[1:])].reason

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return _alternation(enumerate(self.rules))

    @cached_property
    def _dir_regex(self) -> re.Pattern[str]:
        return _alternation((i, r) for i, r in enumerate(self.rules) if not r.files_only)


def _moved(pattern: str, resolve: Callable[[str], str]) -> str | None:
    """`pattern` with the directory its glob lies in (its literal part up to the last
    `/`: /var/log of /var/log/*, /etc/ssh of /etc/ssh/ssh_host_*) where the tree's links
    put it; None if they leave it where it is."""
    literal = re.split(r"[*?[]", pattern, maxsplit=1)[0]
    head = literal.rpartition("/")[0]
    if not head:
        return None
    where = resolve(head)
    return None if where == head else escape(where).rstrip("/") + pattern[len(head) :]


def _alternation(rules: Iterable[tuple[int, Rule]]) -> re.Pattern[str]:
    """One pattern of the rules' globs in order; the group `rN` names the rule that matched
    (alternatives are tried left to right, so the first rule wins)."""
    parts = [f"(?P<r{i}>{translate(r.pattern)})" for i, r in rules]
    return re.compile("|".join(parts) or "(?!)")
