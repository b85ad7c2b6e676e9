"""Exclusions: the one-regex matcher says what the rules, tried in order, say."""

from __future__ import annotations

import random

import pytest

from bootenv.exclude import DEFAULT_RULES, Exclusions, Rule
from bootenv.intree import resolve


def _by_rules(rules: tuple[Rule, ...], path: str, is_dir: bool) -> str | None:
    return next((r.reason for r in rules if r.matches(path, is_dir)), None)


PARTS = "var log etc ssh ssh_host_rsa_key proc 1 tmp srv cache x.log lib dpkg"
PARTS += " status-old apt lists a*b [x] backups dev"


def _paths(rng: random.Random, n: int) -> list[str]:
    parts = PARTS.split()
    return ["/" + "/".join(rng.choice(parts) for _ in range(rng.randint(1, 5))) for _ in range(n)]


@pytest.mark.parametrize("extra", [(), ("/srv/*/cache", "/opt/*.log", "/var/log/*")])
def test_reason_matches_the_rules_in_order(extra: tuple[str, ...]) -> None:
    ex = Exclusions().with_patterns(extra)
    rng = random.Random(7)
    paths = [*_paths(rng, 3000), "/proc/1", "/var/log/apache2", "/etc/ssh/ssh_host_ed25519_key"]
    for path in paths:
        for is_dir in (False, True):
            assert ex.reason(path, is_dir) == _by_rules(ex.rules, path, is_dir), (path, is_dir)


def test_files_only_rules_keep_directories_and_the_first_rule_wins() -> None:
    ex = Exclusions((Rule("/var/log/*", "logs", files_only=True), Rule("/var/*", "var")))
    assert ex.reason("/var/log/apache2", True) == "var"  # logs keeps dirs; the next rule takes it
    assert ex.reason("/var/log/syslog", False) == "logs"
    assert Exclusions(()).reason("/anything", False) is None
    assert Exclusions(DEFAULT_RULES).reason("/etc/hostname", False) is None


def test_an_admins_exclusion_takes_what_lies_below_it() -> None:
    ex = Exclusions().with_patterns(
        (
            "/root/.ssh",
            "/srv/data/",
        )
    )
    for path, is_dir in [("/root/.ssh", True), ("/root/.ssh/id_ed25519", False), ("/srv/data/a/b", False)]:
        assert ex.reason(path, is_dir) == "excluded by --exclude", path
    assert ex.reason("/root/.sshrc", False) is None


@pytest.mark.parametrize(
    "path",
    [
        "/var/lib/bootenv/dpkg/web.status",
        "/var/lib/bootenv/conflicts/web/etc/x",
        "/var/lib/bootenv/layout/state/web.json",
        "/etc/bootenv/layout.json",
        "/etc/bootenv/layout.json.done",
        "/opt/bootenv/bin/python3",
    ],
)
def test_a_provisioned_machines_bootenv_state_is_never_captured(path: str) -> None:
    assert Exclusions().reason(path, False) == "bootenv's own state"


def test_a_rule_also_matches_where_the_trees_links_put_its_directory() -> None:
    """A gold whose /var is a link to /data/var logs in /data/var/log; a directory name
    the links lead to is matched as it is, not as a glob."""
    links = {"/var": "/data/var", "/srv": "/mnt/[x]*", "/up": "/"}
    ex = Exclusions().with_patterns(("/srv/cache", "/up/swap*")).in_tree(lambda p: resolve(p, links.get))
    assert ex.reason("/data/var/log/syslog", False) == "logs"
    assert ex.reason("/data/var/log/httpd", True) is None  # the directories stay
    assert ex.reason("/data/var/lib/systemd/credential.secret", False) == "machine identity"
    assert ex.reason("/data/var/lib/bootenv/layout/journal.json", False) == "bootenv's own state"
    assert ex.reason("/data/var/tmp/scratch", False) == "runtime state"
    assert ex.reason("/var/log/syslog", False) == "logs"  # the rule itself still holds
    assert ex.reason("/mnt/[x]*/cache/a", False) == "excluded by --exclude"
    assert ex.reason("/mnt/x/cache/a", False) is None and ex.reason("/mnt/[x]yz/cache/a", False) is None
    assert ex.reason("/swapfile2", False) == "excluded by --exclude"  # /up -> /: /swap*
    assert Exclusions().in_tree(lambda p: p) == Exclusions()  # no link: the same rules
    rng = random.Random(11)
    for path in [*_paths(rng, 2000), "/data/var/log/x", "/data/var/cache/apt/a"]:
        for is_dir in (False, True):
            assert ex.reason(path, is_dir) == _by_rules(ex.rules, path, is_dir), (path, is_dir)
