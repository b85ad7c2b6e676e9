"""The shared-path rule and metadata: a version whose owner, group, mode or xattrs are not
those of the file in place is neither merged into it nor taken for it; a directory several
components ship ends with the first one's by name, whatever the streams or the order."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bootenv import conflicts, resolution
from bootenv.errors import UserError
from bootenv.layout import LayoutConfig, LayoutResult, layout
from bootenv.xattrs import acl_xattr
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image

ROOT = os.geteuid() == 0
# A service user's: the owner is compared (and given) only by a layout that is root.
OWNER = 999 if ROOT else os.getuid()
SECRET = "[client]\nuser=app\npassword=hunter2\n"


def run(image: Path, root: Path, comps: str | tuple[str, ...], streams: int = 1) -> LayoutResult:
    return layout(LayoutConfig(str(image), comps, root, streams=streams), activator=ActivatedUnits())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_secret_config_is_not_merged_into_a_file_others_may_read(tmp_path: Path) -> None:
    """A component's 0600 client.cnf of its service user, holding a password, meets the
    OS's 0644 root file: merged, the password would be world-readable."""
    comp = Comp(
        "db", [d("etc"), d("etc/db"), f("etc/db/client.cnf", SECRET, mode=0o600, uid=OWNER, gid=OWNER)]
    )
    image = make_image(tmp_path / "img", [comp])
    root = tmp_path / "root"
    conf = root / "etc/db/client.cnf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[client]\nsocket=/run/db.sock\n")
    conf.chmod(0o644)
    res = run(image, root, ("db",))
    (db,) = res.components
    assert res.ok and db.merged == () and len(db.conflicts) == 1
    assert conf.read_text() == "[client]\nsocket=/run/db.sock\n" and _mode(conf) == 0o644
    rec = conflicts.load(root, db.conflicts[0])
    differ = "owner, group and mode" if ROOT else "mode"
    assert rec.reason == f"not merged: different {differ}"
    stored = root / rec.stored
    assert stored.read_text() == SECRET and _mode(stored) == 0o600 and stored.stat().st_uid == OWNER
    # Nor does `resolve --keep merged` give the password the file's mode.
    with pytest.raises(UserError, match=r"not merged: the two versions' .*mode differ"):
        resolution.resolve(root, rec.id, "merged", None)
    assert conf.read_text() == "[client]\nsocket=/run/db.sock\n"
    resolution.resolve(root, rec.id, "incoming", None)
    assert conf.read_text() == SECRET and _mode(conf) == 0o600


def test_a_merged_file_keeps_the_owner_mode_and_xattrs_of_the_file_in_place(tmp_path: Path) -> None:
    """The OS's file, then an admin's chmod of the merge: each merge keeps what the file
    in place has (it took the OS version's mode, whatever the file had since), and only
    versions that agree with it merge."""
    xattr = {"SCHILY.xattr.user.origin": "gold"}
    comps = [
        Comp("a", [d("etc"), f("etc/app.conf", "a=1\n", **xattr)]),
        Comp("b", [d("etc"), f("etc/app.conf", "b=2\n", mode=0o640, **xattr)]),
        Comp("c", [d("etc"), f("etc/app.conf", "c=3\n", **xattr)]),
    ]
    image = make_image(tmp_path / "img", comps)
    root = tmp_path / "root"
    conf = root / "etc/app.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("os=0\n")
    conf.chmod(0o644)
    os.setxattr(conf, "user.origin", b"gold")
    res = run(image, root, ("a",))
    assert res.components[0].merged == ("etc/app.conf",) and conf.read_text() == "os=0\na=1\n"
    assert os.getxattr(conf, "user.origin") == b"gold"
    conf.chmod(0o640)  # the admin's
    res = run(image, root, ("b",))
    assert res.components[0].merged == ("etc/app.conf",) and conf.read_text() == "os=0\na=1\nb=2\n"
    assert _mode(conf) == 0o640 and os.getxattr(conf, "user.origin") == b"gold"
    res = run(image, root, ("c",))
    (c,) = res.components
    assert c.merged == () and conflicts.load(root, c.conflicts[0]).reason == "not merged: different mode"
    assert conf.read_text() == "os=0\na=1\nb=2\n" and _mode(conf) == 0o640


def test_a_merged_file_takes_nothing_from_its_directorys_default_acl(tmp_path: Path) -> None:
    """The merge is written to a new file in the config's directory: a default ACL there
    would give it an ACL (user 4242 may read it) the file in place did not have."""
    image = make_image(
        tmp_path / "img", [Comp("a", [d("etc"), d("etc/app"), f("etc/app/app.conf", "a=1\n")])]
    )
    root = tmp_path / "root"
    conf = root / "etc/app/app.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("os=0\n")
    conf.chmod(0o644)
    acl = acl_xattr("user::rwx,user:4242:rwx,group::r-x,mask::rwx,other::r-x")
    os.setxattr(conf.parent, "system.posix_acl_default", acl)
    (a,) = run(image, root, ("a",)).components
    assert a.merged == ("etc/app/app.conf",) and conf.read_text() == "os=0\na=1\n"
    assert os.listxattr(conf) == [] and _mode(conf) == 0o644


def test_a_config_whose_xattrs_differ_is_not_merged(tmp_path: Path) -> None:
    comp = Comp("a", [d("etc"), f("etc/app.conf", "a=1\n", **{"SCHILY.xattr.user.origin": "a"})])
    image = make_image(tmp_path / "img", [comp])
    root = tmp_path / "root"
    conf = root / "etc/app.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("os=0\n")
    conf.chmod(0o644)
    (a,) = run(image, root, ("a",)).components
    assert a.merged == () and conflicts.load(root, a.conflicts[0]).reason == "not merged: different xattrs"
    assert conf.read_text() == "os=0\n" and os.listxattr(conf) == []


def test_resolve_merged_refuses_versions_whose_xattrs_differ(tmp_path: Path) -> None:
    """The layout did not merge them (the ACL lets uid 33 read the file in place, and
    would let it read the component's text): nor does `resolve --keep merged`."""
    image = make_image(tmp_path / "img", [Comp("a", [d("etc"), f("etc/app.conf", "a=1\n", mode=0o640)])])
    root = tmp_path / "root"
    conf = root / "etc/app.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("os=0\n")
    conf.chmod(0o640)
    os.setxattr(conf, "user.acl", b"33:r")
    (a,) = run(image, root, ("a",)).components
    assert conflicts.load(root, a.conflicts[0]).reason == "not merged: different xattrs"
    with pytest.raises(UserError, match=r"^/etc/app\.conf: not merged: the two versions' xattrs differ"):
        resolution.resolve(root, a.conflicts[0], "merged", None)
    assert conf.read_text() == "os=0\n" and os.getxattr(conf, "user.acl") == b"33:r"
    assert conflicts.load(root, a.conflicts[0]).resolution is None


@pytest.mark.parametrize("how", ["merged", "file"])
def test_a_resolution_that_writes_the_file_keeps_its_xattrs(tmp_path: Path, how: str) -> None:
    """`--keep merged` and `--file` put new bytes in place of the file: its ACLs and
    other xattrs stay (the file in place's, which a merge's versions share)."""
    acl = {"SCHILY.xattr.user.acl": "33:r"}
    image = make_image(tmp_path / "img", [Comp("a", [d("usr"), f("usr/notes.txt", "a=1\n", **acl)])])
    root = tmp_path / "root"
    notes = root / "usr/notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("os=0\n")
    notes.chmod(0o644)
    os.setxattr(notes, "user.acl", b"33:r")
    (a,) = run(image, root, ("a",)).components
    assert conflicts.load(root, a.conflicts[0]).reason == "different content"
    mine = tmp_path / "mine"
    mine.write_text("mine\n")
    resolution.resolve(root, a.conflicts[0], *(("merged", None) if how == "merged" else (None, mine)))
    assert notes.read_text() == ("os=0\na=1\n" if how == "merged" else "mine\n")
    assert os.listxattr(notes) == ["user.acl"] and os.getxattr(notes, "user.acl") == b"33:r"
    assert _mode(notes) == 0o644


@pytest.mark.parametrize(
    ("mode", "pax", "differ"),
    [
        (0o4755, {}, "mode"),
        (0o755, {"SCHILY.xattr.user.flag": "1"}, "xattrs"),
        (0o4755, {"SCHILY.xattr.user.flag": "1"}, "mode and xattrs"),
    ],
)
def test_the_same_bytes_with_other_metadata_are_a_conflict_not_identical(
    tmp_path: Path, mode: int, pax: dict[str, str], differ: str
) -> None:
    """The file in place holds the component's bytes, but not its setuid bit or its
    xattrs: counted identical, they would be lost without a word."""
    image = make_image(
        tmp_path / "img", [Comp("web", [d("usr"), d("usr/bin"), f("usr/bin/pinger", "ELF", mode, **pax)])]
    )
    root = tmp_path / "root"
    tool = root / "usr/bin/pinger"
    tool.parent.mkdir(parents=True)
    tool.write_text("ELF")
    tool.chmod(0o755)
    (web,) = run(image, root, ("web",)).components
    assert web.identical == 0 and len(web.conflicts) == 1
    rec = conflicts.load(root, web.conflicts[0])
    assert rec.reason == f"same content, different {differ}"
    assert _mode(tool) == 0o755 and os.listxattr(tool) == []  # the one in place stays as it was
    stored = root / rec.stored
    assert stored.read_text() == "ELF" and _mode(stored) == mode
    assert os.listxattr(stored) == (["user.flag"] if pax else [])


@pytest.mark.skipif(not ROOT, reason="a file capability and another owner need root")
def test_a_file_capability_or_owner_missing_in_place_is_a_conflict(tmp_path: Path) -> None:
    cap = "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12  # cap_net_raw+ep, as tar stores it
    members = [
        d("usr"),
        d("usr/bin"),
        f("usr/bin/pinger", "ELF", 0o755, **{"SCHILY.xattr.security.capability": cap}),
        f("usr/bin/tool", "ELF", 0o755, uid=OWNER),
    ]
    image = make_image(tmp_path / "img", [Comp("web", members)])
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    for name in ("pinger", "tool"):
        (root / "usr/bin" / name).write_text("ELF")
        (root / "usr/bin" / name).chmod(0o755)
    (web,) = run(image, root, ("web",)).components
    reasons = {(r.path, r.reason) for r in map(lambda cid: conflicts.load(root, cid), web.conflicts)}
    assert reasons == {
        ("usr/bin/pinger", "same content, different xattrs"),
        ("usr/bin/tool", "same content, different owner"),
    }
    assert "security.capability" in os.listxattr(root / "var/lib/bootenv/conflicts/web/usr/bin/pinger")


def test_the_same_file_with_the_same_metadata_is_still_identical(tmp_path: Path) -> None:
    pax = {"SCHILY.xattr.user.flag": "1"}
    image = make_image(tmp_path / "img", [Comp("web", [d("usr"), f("usr/tool", "ELF", 0o4755, **pax)])])
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/tool").write_text("ELF")
    (root / "usr/tool").chmod(0o4755)
    os.setxattr(root / "usr/tool", "user.flag", b"1")
    (web,) = run(image, root, ("web",)).components
    assert (web.identical, web.conflicts) == (1, ())


def _sharing(name: str, mode: int, owner: int = 0, **pax: str) -> Comp:
    """A component with /etc/shared of its own owner and mode, and a file in it."""
    shared = d("etc/shared", mode=mode, uid=owner if ROOT else 0, gid=owner if ROOT else 0)
    shared.pax_headers = dict(pax)
    return Comp(name, [d("etc"), shared, f(f"etc/shared/{name}", name)])


# One stream makes their directories in name order; two or four race for /etc/shared,
# and gamma's xattr must not outlive its metadata.
SHARING = [
    _sharing("gamma", 0o700, OWNER, **{"SCHILY.xattr.user.by": "gamma"}),
    _sharing("beta", 0o755),
    _sharing("alpha", 0o750, 4),
]


def _shared(root: Path) -> tuple[int, int, int, list[str]]:
    st = (root / "etc/shared").lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, sorted(os.listxattr(root / "etc/shared"))


ALPHA = (0o750, 4 if ROOT else os.getuid(), 4 if ROOT else os.getgid(), [])


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_a_directory_components_make_has_the_first_by_names_metadata_whatever_the_streams(
    tmp_path: Path, streams: int
) -> None:
    image = make_image(tmp_path / "img", SHARING)
    for i in range(3):
        root = tmp_path / f"root{i}"
        root.mkdir()
        res = run(image, root, "all", streams=streams)
        assert res.ok and not any(c.conflicts for c in res.components)
        assert _shared(root) == ALPHA
        assert sorted(p.name for p in (root / "etc/shared").iterdir()) == ["alpha", "beta", "gamma"]
        # Which of the others is told, and of whose metadata (beta's, before alpha came),
        # depends on who came first: alpha, never.
        warned = {c.name: c.warnings for c in res.components}
        assert warned["alpha"] == ()
        assert all(w.startswith("directory /etc/shared keeps ") for w in warned["beta"] + warned["gamma"])


@pytest.mark.parametrize(
    "order", [("gamma", "beta", "alpha"), ("beta", "alpha", "gamma"), ("alpha", "gamma", "beta")]
)
def test_a_directory_components_make_has_the_first_by_names_metadata_whatever_the_order(
    tmp_path: Path, order: tuple[str, ...]
) -> None:
    """One layout per component, in any order: the same directory as all at once."""
    image = make_image(tmp_path / "img", SHARING)
    root = tmp_path / "root"
    root.mkdir()
    for name in order:
        assert run(image, root, (name,)).ok
    assert _shared(root) == ALPHA


def test_a_directory_in_place_keeps_its_metadata_and_the_component_is_warned(tmp_path: Path) -> None:
    """The OS's directory, and one bootenv made whose mode the admin changed since."""
    image = make_image(tmp_path / "img", SHARING)
    root = tmp_path / "root"
    (root / "etc/shared").mkdir(parents=True)
    (root / "etc/shared").chmod(0o711)
    before = _shared(root)
    (alpha,) = run(image, root, ("alpha",)).components
    assert _shared(root) == before
    assert alpha.warnings == (
        f"directory /etc/shared keeps its owner and mode ({before[0]:04o} "
        f"{before[1]}:{before[2]}), not this component's ({ALPHA[0]:04o} {ALPHA[1]}:{ALPHA[2]})",
    )

    root = tmp_path / "edited"
    root.mkdir()
    assert run(image, root, ("gamma",)).ok
    (root / "etc/shared").chmod(0o711)  # the admin's
    (alpha,) = run(image, root, ("alpha",)).components
    assert _shared(root)[0] == 0o711 and _shared(root)[3] == ["user.by"]
    assert alpha.warnings[0].startswith("directory /etc/shared keeps its owner and mode (0711")


def test_a_directory_whose_xattrs_the_admin_changed_keeps_them_and_the_component_is_warned(
    tmp_path: Path,
) -> None:
    """A default ACL and an xattr the admin gave a directory bootenv made, its mode
    unchanged: a component that sorts before its maker took it over, and they went
    without a word. Now they stay, with the maker's owner and mode, and it is warned."""
    # Unchanged, one with ACLs of its own (as the kernel holds them) is taken over.
    acls = {"SCHILY.acl.access": "user::rwx,user:33:r-x,group::---,mask::r-x,other::---"}
    acls["SCHILY.acl.default"] = acls["SCHILY.acl.access"]
    image = make_image(tmp_path / "acl", [_sharing("gamma", 0o750, OWNER, **acls), SHARING[2]])
    root = tmp_path / "unchanged"
    root.mkdir()
    assert run(image, root, ("gamma",)).ok
    assert len(_shared(root)[3]) == 2
    (alpha,) = run(image, root, ("alpha",)).components
    assert _shared(root) == ALPHA and alpha.warnings == ()

    image = make_image(tmp_path / "img", SHARING)
    root = tmp_path / "root"
    root.mkdir()
    assert run(image, root, ("gamma",)).ok
    shared = root / "etc/shared"
    acl = acl_xattr("user::rwx,user:33:rwx,group::r-x,mask::rwx,other::r-x")
    os.setxattr(shared, "system.posix_acl_default", acl)
    os.setxattr(shared, "user.backup-policy", b"daily")
    before = _shared(root)
    assert before[0] == 0o700
    (alpha,) = run(image, root, ("alpha",)).components
    assert alpha.status == "done"
    assert _shared(root) == before
    assert os.getxattr(shared, "system.posix_acl_default") == acl
    assert os.getxattr(shared, "user.backup-policy") == b"daily"
    assert alpha.warnings == (
        f"directory /etc/shared keeps gamma's owner and mode (0700 {before[1]}:{before[2]}), "
        f"not this component's ({ALPHA[0]:04o} {ALPHA[1]}:{ALPHA[2]})",
        "directory /etc/shared keeps its xattrs (system.posix_acl_default, user.backup-policy, "
        "user.by), changed since it was made, not this component's",
    )


def _os_dir(root: Path, mode: int, uid: int, gid: int, **xattrs: bytes) -> Path:
    """The OS's /etc/shared: in place before any layout, so with no record of who made it."""
    shared = root / "etc/shared"
    shared.mkdir(parents=True)
    os.chown(shared, uid, gid)
    shared.chmod(mode)
    for key, value in xattrs.items():
        os.setxattr(shared, key, value)
    return shared


def test_a_directory_in_place_with_no_record_keeps_its_xattrs_and_the_component_is_warned(
    tmp_path: Path,
) -> None:
    """The OS's directory keeps its owner, mode and xattrs; a component whose owner or
    mode differ was warned, one whose xattrs differ was not. Their owner and mode are the
    same here: only the xattrs differ, either way."""
    acl = acl_xattr("user::rwx,user:33:rwx,group::r-x,mask::rwx,other::r-x")
    image = make_image(tmp_path / "img", SHARING)
    root = tmp_path / "admins"
    shared = _os_dir(root, *ALPHA[:3], **{"system.posix_acl_default": acl, "user.backup-policy": b"daily"})
    (alpha,) = run(image, root, ("alpha",)).components
    assert alpha.status == "done" and _shared(root)[3] == ["system.posix_acl_default", "user.backup-policy"]
    assert alpha.warnings == (
        "directory /etc/shared keeps its xattrs (system.posix_acl_default, user.backup-policy), "
        "not this component's (none)",
    )
    # Its default ACL is not given to the component's file, as with no warning.
    assert "system.posix_acl_access" not in os.listxattr(shared / "alpha")

    gamma = (0o700, OWNER, OWNER)
    root = tmp_path / "bare"
    _os_dir(root, *gamma)
    (comp,) = run(image, root, ("gamma",)).components
    assert _shared(root) == (*gamma, [])
    assert comp.warnings == ("directory /etc/shared keeps its xattrs (none), not this component's (user.by)",)

    differ = "directory /etc/shared keeps its xattrs' values (user.by), not this component's"
    for value, warned in ((b"gamma", ()), (b"other", (differ,))):  # the same name, another value
        root = tmp_path / value.decode()
        _os_dir(root, *gamma, **{"user.by": value})
        (comp,) = run(image, root, ("gamma",)).components
        assert os.getxattr(root / "etc/shared", "user.by") == value
        assert comp.warnings == warned


def test_a_directory_in_place_with_no_record_costs_one_xattr_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case, the OS's directories under a component's files: whether one has
    xattrs other than the component's, and a default ACL, is asked in one call."""
    dirs = ["etc", "etc/a", "etc/a/b", "etc/c"]
    files = [f(f"{p}/f{i}", "x") for p in dirs[1:] for i in range(10)]
    image = make_image(tmp_path / "img", [Comp("web", [*map(d, dirs), *files])])
    root = tmp_path / "root"
    for p in dirs:
        (root / p).mkdir(parents=True)
    calls: list[str] = []
    for name in ("getxattr", "removexattr", "listxattr"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1]
        )
    (web,) = run(image, root, ("web",)).components
    assert web.files == len(files) and web.warnings == ()
    # The root, by the writer of the stream and the one that finishes, and each directory.
    assert len(calls) <= 2 + len(dirs), calls


def test_a_component_that_sorts_after_the_maker_is_warned_of_its_xattrs_too(tmp_path: Path) -> None:
    """As of its owner and mode: gamma's user.by does not go on the directory alpha made."""
    image = make_image(tmp_path / "img", SHARING)
    root = tmp_path / "root"
    root.mkdir()
    assert run(image, root, ("alpha",)).ok
    (gamma,) = run(image, root, ("gamma",)).components
    assert _shared(root) == ALPHA
    assert gamma.warnings == (
        f"directory /etc/shared keeps alpha's owner and mode ({ALPHA[0]:04o} {ALPHA[1]}:{ALPHA[2]}), "
        f"not this component's (0700 {OWNER}:{OWNER})",
        "directory /etc/shared keeps alpha's xattrs (none), not this component's (user.by)",
    )
