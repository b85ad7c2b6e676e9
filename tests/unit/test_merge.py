"""The shared-path rule's pure parts: what is mergeable and how pieces concatenate."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from bootenv import merge
from bootenv.dpkg import parse_stanzas, render_status
from bootenv.dpkgmerge import merged_status
from bootenv.merge import MergeState, Meta, concatenate, is_candidate


def test_candidates_are_text_under_etc() -> None:
    assert is_candidate("etc/apache2/ports.conf", b"Listen 80\n")
    assert not is_candidate("usr/lib/x.so", b"text")
    assert not is_candidate("etc/ld.so.cache", b"bin\0ary")
    assert not is_candidate("etc/huge", b"x" * ((1 << 20) + 1))


def test_concatenation_is_base_then_parts_by_name() -> None:
    parts = {"php": b"php\n", "apache": b"apache"}
    assert concatenate(b"os\n", parts) == b"os\napache\nphp\n"
    assert concatenate(None, parts) == b"apache\nphp\n"


def test_duplicates_and_base_copies_appear_once() -> None:
    assert concatenate(b"os\n", {"a": b"os\n", "b": b"b\n", "c": b"b\n"}) == b"os\nb\n"
    assert concatenate(None, {"a": b"same\n", "b": b"same\n"}) == b"same\n"


@pytest.mark.parametrize("copy", [b"Listen 80", b"Listen 80\r\n", b"Listen 80\n\n", b"Listen 80\r\n\r\n"])
def test_a_copy_that_differs_only_in_its_line_ends_appears_once(copy: bytes) -> None:
    """The OS's file saved without its last newline, or with CRLF: the component's
    version is the same config, not a second copy of it."""
    assert concatenate(copy, {"web": b"Listen 80\n"}) == copy
    assert concatenate(b"# os\n", {"a": copy, "b": b"Listen 80\n"}) == b"# os\n" + copy + (
        b"" if copy.endswith(b"\n") else b"\n"
    )
    # Only the line ends: another line, or the same lines in another order, is another piece.
    assert concatenate(copy, {"web": b"Listen 80\nListen 80\n"}).count(b"Listen") == 3
    assert concatenate(b"a\nb\n", {"x": b"b\na\n"}) == b"a\nb\nb\na\n"


def test_result_does_not_depend_on_insertion_order() -> None:
    items = [("c", b"3"), ("a", b"1"), ("b", b"2")]
    results = {concatenate(b"0", dict(p)) for p in itertools.permutations(items)}
    assert results == {b"0\n1\n2\n3\n"}


def test_dpkg_status_merge_replaces_in_place_and_appends() -> None:
    current = "Package: a\nStatus: install ok installed\n\nPackage: b\nStatus: deinstall ok config-files\n\n"
    incoming = (
        "Package: b\nStatus: install ok installed\nVersion: 2\n\nPackage: c\nStatus: install ok installed\n"
    )
    once = merged_status(current, incoming)
    assert once.index("Package: a") < once.index("Package: b") < once.index("Package: c")
    assert "config-files" not in once and once.count("Package: b") == 1
    assert merged_status(once, incoming) == once


def test_dpkg_status_is_the_same_whatever_order_components_merge_in() -> None:
    base = (
        "Package: base-files\nStatus: install ok installed\n\nPackage: zlib1g\nStatus: install ok installed\n"
    )
    comps = {
        "apache": "Package: apache2\nStatus: install ok installed\n",
        "mysql": (
            "Package: mariadb-server\nStatus: install ok installed\n\n"
            "Package: libaio1\nStatus: install ok installed\n"
        ),
        "php": "Package: php8.2\nStatus: install ok installed\n",
    }
    results = set()
    for order in itertools.permutations(comps):
        text = base
        for name in order:
            text = merged_status(text, comps[name])
        results.add(text)
    assert len(results) == 1
    packages = [line[9:] for line in results.pop().splitlines() if line.startswith("Package: ")]
    assert packages == sorted(packages) and len(packages) == 6


def test_a_package_on_disk_at_another_version_keeps_its_paragraph() -> None:
    """A target that is not a clone of the gold: its libxml2 files stayed (the layout
    never overwrites), so its database must still describe them."""
    current = (
        "Package: libxml2\nStatus: install ok installed\nVersion: 2.9.14+dfsg-1.3~deb12u1\n\n"
        "Package: old\nStatus: deinstall ok config-files\nVersion: 1\n"
    )
    incoming = (
        "Package: libxml2\nStatus: install ok installed\nVersion: 2.9.14+dfsg-1.3~deb12u6\n\n"
        "Package: old\nStatus: install ok installed\nVersion: 2\n"
    )
    kept: list[str] = []
    text = merged_status(current, incoming, kept)
    assert "deb12u1" in text and "deb12u6" not in text
    assert "Package: old\nStatus: install ok installed\nVersion: 2" in text  # only its config was there
    assert kept == [
        "libxml2 2.9.14+dfsg-1.3~deb12u1 is installed, the component ships 2.9.14+dfsg-1.3~deb12u6"
    ]
    same: list[str] = []
    assert merged_status(text, incoming.replace("deb12u6", "deb12u1"), same) == text and same == []


def test_text_is_utf8_without_control_bytes() -> None:
    assert is_candidate("etc/motd", "café\tbar\r\n\f".encode())
    assert not is_candidate("etc/app.key", bytes(range(1, 33)))  # no NUL, still a key
    assert not is_candidate("etc/latin1.conf", "café".encode("latin-1"))
    assert not is_candidate("etc/del.conf", b"a\x7fb\n")


def test_each_record_is_synced_before_its_name_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record is the only copy of the OS's version: its data reaches the disk before
    the rename that names it, or a power cut could leave the name on an empty file."""
    synced: set[str] = set()
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(str(dst))
        assert str(src) in synced, f"{src} renamed unsynced"
        real_replace(src, dst)

    monkeypatch.setattr(merge.os, "fsync", fsync)
    monkeypatch.setattr(merge.os, "replace", replace)
    state = MergeState(tmp_path)
    conf = tmp_path / "etc/foo.conf"
    conf.parent.mkdir()
    conf.write_bytes(b"os\n")

    def apply(content: bytes, meta: Meta) -> None:
        conf.write_bytes(content)

    meta = Meta(0o644, 0, 0, 0)
    changed = state.merge_into("etc/foo.conf", "a", b"a\n", meta, lambda: (conf.read_bytes(), meta), apply)
    assert changed and conf.read_bytes() == b"os\na\n"
    names = {Path(e).name for e in events}
    assert {"base", "base.meta", "part.a", "part.a.meta", "ours", "init", "path"} <= names


def test_a_package_is_listed_once_whatever_its_architecture() -> None:
    """A paragraph takes the place of its package's, of any architecture; a package on
    disk under another architecture keeps its own; Multi-Arch: same ones sit side by side."""
    gone = "Package: tool\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 1\n"
    amd64 = "Package: tool\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2\n"
    text = merged_status(gone, amd64)
    assert text.count("Package: tool") == 1 and "Architecture: amd64" in text
    assert merged_status(text, amd64) == text

    kept: list[str] = []
    on_disk = gone.replace("deinstall ok config-files", "install ok installed")
    assert merged_status(on_disk, amd64, kept) == render_status(parse_stanzas(on_disk))
    assert kept == ["tool 1 (all) is installed, the component ships 2 (amd64)"]

    lib = "Package: libz\nStatus: install ok installed\nMulti-Arch: same\nVersion: 1\nArchitecture: "
    both = merged_status(lib + "i386\n", lib + "amd64\n")
    assert [line for line in both.splitlines() if line.startswith("Architecture")] == [
        "Architecture: amd64",
        "Architecture: i386",
    ]
