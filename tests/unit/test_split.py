"""The split rules on the synthetic gold machine (tests/unit/fakeroot.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv.assign import plan_split
from bootenv.dpkg import parse_relations, read_database
from bootenv.errors import UserError
from bootenv.exclude import Exclusions
from bootenv.split import OS, ComponentSpec, Split, assign_packages, base_packages, parse_component_arg
from bootenv.walk import Kind, scan
from tests.unit.fakeroot import make_tree

SPECS = (
    ComponentSpec("web", ("httpd",)),
    ComponentSpec("db", ("dbserver",)),
    ComponentSpec("php", ("modphp",)),
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "gold")


@pytest.fixture
def split(tree: Path) -> Split:
    return plan_split(read_database(tree), SPECS, scan(tree), Exclusions())


def test_relations_drop_versions_and_arch_qualifiers() -> None:
    assert parse_relations("a (>= 1) | b:any, c") == (("a", "b"), ("c",))
    assert parse_relations("") == ()


def test_base_is_priority_required_and_its_closure(tree: Path) -> None:
    assert base_packages(read_database(tree)) == {"libc6", "base-files", "dpkg"}


def test_package_owners(tree: Path) -> None:
    owner, depends, _ = assign_packages(read_database(tree), SPECS)
    assert owner["httpd"] == owner["httpd-bin"] == owner["libapr"] == "web"
    assert owner["dbserver"] == owner["libdb"] == "db"
    assert owner["modphp"] == "php"
    # libcurl is needed by curl, which no component claims: it must stay in the OS.
    assert owner["curl"] == owner["libcurl"] == OS
    # libxml is shared by web and db, which don't depend on each other: the OS.
    assert owner["libxml"] == OS
    # phpcli is claimed by no component and reaches none: OS.
    assert owner["phpcli"] == OS
    assert depends == {"web": (), "db": (), "php": ("web",)}


def test_shared_package_goes_to_the_component_depended_on(tree: Path) -> None:
    owner, _, _ = assign_packages(read_database(tree), SPECS)
    # modphp depends on httpd-bin (through the virtual httpd-api-2) and recommends httpd.
    assert owner["httpd-bin"] == "web"


def test_addon_package_joins_the_component_it_extends(tree: Path) -> None:
    owner, _, _ = assign_packages(read_database(tree), (ComponentSpec("web", ("httpd",)),))
    # modphp is claimed by no component but depends on web's httpd-bin: it joins web.
    assert owner["modphp"] == "web"


def test_naming_a_shared_package_decides_its_owner(tree: Path) -> None:
    specs = (ComponentSpec("a", ("modphp",)), ComponentSpec("b", ("httpd", "httpd-bin")))
    owner, depends, _ = assign_packages(read_database(tree), specs)
    assert depends["a"] == ("b",)
    assert owner["httpd-bin"] == "b"


def test_cycle_between_components_is_an_error(tree: Path) -> None:
    specs = (ComponentSpec("a", ("cyc-a",)), ComponentSpec("b", ("cyc-b",)))
    with pytest.raises(UserError, match="depend on each other"):
        assign_packages(read_database(tree), specs)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ((ComponentSpec("web", ("htpd",)),), "did you mean httpd"),
        ((ComponentSpec("web", ("httpd",)), ComponentSpec("w2", ("httpd",))), "claimed by both"),
        ((ComponentSpec("web", ("dpkg",)),), "part of the base OS"),
        ((ComponentSpec("OS", ("httpd",)),), "invalid component name"),
        ((ComponentSpec("all", ("httpd",)),), "invalid component name"),
        ((ComponentSpec("web", ("httpd",)), ComponentSpec("web", ("dbserver",))), "given twice"),
    ],
)
def test_bad_component_specs(tree: Path, specs: tuple[ComponentSpec, ...], message: str) -> None:
    with pytest.raises(UserError) as err:
        plan_split(read_database(tree), specs, scan(tree), Exclusions())
    assert message in str(err.value)


def test_no_dpkg_database(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no dpkg database"):
        read_database(tmp_path)


def test_parse_component_arg() -> None:
    assert parse_component_arg("db=dbserver, libdb,/var/lib/x/") == ComponentSpec(
        "db", ("dbserver", "libdb"), ("/var/lib/x",)
    )
    with pytest.raises(UserError):
        parse_component_arg("db")
    with pytest.raises(UserError):
        parse_component_arg("db=")


@pytest.mark.parametrize(
    ("path", "image"),
    [
        ("/usr/sbin/httpd", "web"),  # owned by a component package
        ("/usr/lib/systemd/system/httpd.service", "web"),  # dpkg says /lib/..., merged /usr
        ("/etc/httpd/sites/local.conf", "web"),  # unowned: closest owned directory
        ("/etc/systemd/system/multi-user.target.wants/httpd.service", "web"),  # enablement link
        ("/etc/systemd/system/multi-user.target.wants/dbd.service", "db"),
        ("/etc/alternatives/php", "php"),  # alternatives link into a component
        ("/usr/bin/php", "php"),  # link chain through /etc/alternatives
        ("/var/lib/dpkg/alternatives/php", "php"),  # alternatives database follows the link
        ("/etc/httpd/sites/php.load", "php"),  # relative link to another component's file
        ("/var/lib/dbdata/ibdata1", "db"),  # data dir named by the postinst
        ("/var/lib/dpkg/info/httpd.list", "web"),  # package database travels with it
        ("/var/lib/dpkg/info/libc6:amd64.list", OS),
        ("/var/lib/dpkg/status", OS),
        ("/etc/admin-notes.txt", OS),  # unowned, under the OS
        ("/usr/bin/curl", OS),
        ("/etc/shared.conf", "db"),
        ("/etc/control.fifo", OS),
    ],
)
def test_path_rules(split: Split, path: str, image: str) -> None:
    assert split.image_of(path) == image


def test_postinst_mentions_of_system_files_are_not_claimed(split: Split) -> None:
    # dbserver's postinst names /etc/passwd: two levels deep, never claimed.
    assert split.image_of("/etc/hostname") == OS


def test_exclusions(split: Split) -> None:
    excluded = dict(split.excluded)
    assert excluded["/etc/machine-id"] == "machine identity"
    assert excluded["/proc/1"] == "runtime state"
    assert excluded["/var/log/httpd/access.log"] == "logs"
    assert excluded["/var/log/syslog"] == "logs"
    # The log directory itself is kept (services need it, with its owner and mode).
    assert "/var/log/httpd" in split.dirs["web"]
    assert "/proc" in split.dirs[OS]


def test_every_path_lands_in_exactly_one_image_or_is_excluded(tree: Path, split: Split) -> None:
    entries = scan(tree)
    excluded = {p for p, _ in split.excluded}
    for entry in entries:
        if entry.kind is Kind.DIR:
            carriers = [i for i, ds in split.dirs.items() if entry.path in ds]
            assert carriers or entry.path in excluded, entry.path
            continue
        homes = [i for i, fs in split.files.items() if entry.path in fs]
        assert len(homes) + (entry.path in excluded) == 1, (entry.path, homes)


def test_component_carries_parent_directories(split: Split) -> None:
    assert {"/usr", "/usr/lib", "/usr/lib/httpd"} <= set(split.dirs["php"])


def test_odd_bytes_in_names(split: Split) -> None:
    odd = [p for p in split.files[OS] if "odd" in p]
    assert odd == ["/etc/odd \udcff name\nx"]


def test_socket_is_excluded_on_purpose(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "g", with_socket=True)
    split = plan_split(read_database(tree), SPECS, scan(tree), Exclusions())
    assert dict(split.excluded)["/etc/agent.sock"] == "socket"


def test_extra_exclude_patterns(tree: Path) -> None:
    split = plan_split(
        read_database(tree), SPECS, scan(tree), Exclusions().with_patterns(("/etc/httpd/sites/*",))
    )
    assert dict(split.excluded)["/etc/httpd/sites/local.conf"] == "excluded by --exclude"


def test_admin_path_claim(tree: Path) -> None:
    specs = (ComponentSpec("web", ("httpd",), ("/etc/admin-notes.txt",)),)
    split = plan_split(read_database(tree), specs, scan(tree), Exclusions())
    assert split.image_of("/etc/admin-notes.txt") == "web"
