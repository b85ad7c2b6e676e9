"""The split rules on the synthetic gold machine (tests/unit/fakeroot.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv.assign import plan_split
from bootenv.dpkg import parse_relations, parse_status, read_database, render_status
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


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic gold tree for the module, which only reads it (a test that changes it
    makes its own)."""
    return make_tree(tmp_path_factory.mktemp("split") / "gold")


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


def test_postinst_mentions_of_system_files_are_not_claimed(tree: Path, split: Split) -> None:
    # dbserver's postinst names /etc/passwd: two levels deep, never claimed.
    assert "/etc/passwd" in read_database(tree).script_paths["dbserver"]
    assert split.image_of("/etc/passwd") == OS


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
    # A path of the component's own packages, with an admin's file in it: the component's.
    specs = (ComponentSpec("web", ("httpd",), ("/etc/httpd",)),)
    split = plan_split(read_database(tree), specs, scan(tree), Exclusions())
    assert split.image_of("/etc/httpd/sites/local.conf") == split.image_of("/etc/httpd/httpd.conf") == "web"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "web=httpd,/usr/bin",
            "component web: /usr/bin is a path of package base-files, in the OS (hint: a /PATH assigns only "
            "paths no package outside the component owns; name one below it)",
        ),
        ("web=httpd,/usr", "component web: /usr is a path of package base-files, in the OS"),
        ("web=httpd,/usr/bin/dpkg", "component web: /usr/bin/dpkg is a path of package dpkg, in the OS"),
        (
            "web=httpd,/var/lib/dpkg",
            "component web: /var/lib/dpkg is dpkg's database (/var/lib/dpkg) (hint: dpkg",
        ),
        (
            "web=httpd,/var/lib/dpkg/info/httpd.list",
            "component web: /var/lib/dpkg/info/httpd.list is in dpkg's",
        ),
        ("web=httpd,/var", "component web: /var holds dpkg's database (/var/lib/dpkg)"),
        ("db=dbserver,/etc/httpd", "component db: /etc/httpd is a path of package httpd, in component web"),
        # dpkg records /lib/systemd/...; the tree has it in /usr/lib (merged /usr).
        (
            "db=dbserver,/usr/lib/systemd",
            "component db: /usr/lib/systemd holds /usr/lib/systemd/system/httpd.service, which is a path of "
            "package httpd, in component web",
        ),
    ],
)
def test_an_admin_path_holding_another_sub_images_files_is_refused(
    tree: Path, spec: str, message: str
) -> None:
    specs = (parse_component_arg(spec), ComponentSpec("php", ("modphp",)))
    if not any(s.name == "web" for s in specs):
        specs += (ComponentSpec("web", ("httpd",)),)
    with pytest.raises(UserError) as err:
        plan_split(read_database(tree), specs, scan(tree), Exclusions())
    assert str(err.value).startswith(message)


def _stanza(name: str, arch: str, multi_arch: str = "same", depends: str = "") -> str:
    text = f"Package: {name}\nStatus: install ok installed\nPriority: optional\nArchitecture: {arch}\n"
    text += f"Multi-Arch: {multi_arch}\nVersion: 1\n"
    return text + (f"Depends: {depends}\n" if depends else "")


def test_a_multi_arch_same_package_keeps_every_architecture(tmp_path: Path) -> None:
    """libc6:amd64 and libc6:i386 are one package to the split: neither instance's
    status paragraph or files may be dropped."""
    info = tmp_path / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    status = (
        _stanza("libc6", "amd64", depends="libgcc-s1") + "\n" + _stanza("libc6", "i386", depends="libcrypt1")
    )
    (tmp_path / "var/lib/dpkg/status").write_text(status)
    (info / "libc6:amd64.list").write_text("/.\n/lib\n/lib/x86_64-linux-gnu/libc.so.6\n")
    (info / "libc6:i386.list").write_text("/.\n/lib\n/lib/i386-linux-gnu/libc.so.6\n")
    db = read_database(tmp_path)
    libc = db.packages["libc6"]
    assert (libc.arch, libc.other_arches) == ("amd64", ("i386",))
    assert libc.info_prefixes == ("libc6:amd64", "libc6:i386")
    assert db.files["libc6"] == ("/lib", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/i386-linux-gnu/libc.so.6")
    assert libc.depends == (("libgcc-s1",), ("libcrypt1",))
    rendered = render_status([libc.stanza])
    assert rendered.count("Package: libc6\n") == 2 and "Architecture: i386" in rendered
    assert parse_status(rendered)[0]["libc6"] == libc


def test_a_package_installed_twice_otherwise_is_refused() -> None:
    with pytest.raises(UserError, match="installed twice"):
        parse_status(_stanza("curl", "amd64", "no") + "\n" + _stanza("curl", "i386", "no"))
    with pytest.raises(UserError, match="installed twice"):
        parse_status(_stanza("libc6", "amd64") + "\n" + _stanza("libc6", "amd64"))


def test_a_path_two_components_ship_goes_to_the_one_the_other_needs(tmp_path: Path) -> None:
    """/etc/httpd/mods shipped by httpd (web) and modphp (php, which depends on web): web
    owns it, and an admin's file in it follows (rule 6), so OS + db carries no trace of
    the web server. Two components that need neither leave it to the OS."""
    tree = make_tree(tmp_path / "gold")  # its own: the test adds to its database
    info = tree / "var/lib/dpkg/info"
    for pkg in ("httpd", "modphp"):
        with open(info / f"{pkg}.list", "a") as f:
            f.write("/etc/httpd/mods\n")
    (tree / "etc/httpd/mods/custom.load").write_text("LoadModule custom\n")
    split = plan_split(read_database(tree), SPECS, scan(tree), Exclusions())
    assert "/etc/httpd/mods" in split.dirs["web"] and "/etc/httpd/mods" not in split.dirs[OS]
    assert "/etc/httpd/mods/custom.load" in split.files["web"]
    with open(info / "dbserver.list", "a") as f:
        f.write("/etc/httpd/mods\n")  # db needs neither web nor php
    split = plan_split(read_database(tree), SPECS, scan(tree), Exclusions())
    assert "/etc/httpd/mods/custom.load" in split.files[OS]
