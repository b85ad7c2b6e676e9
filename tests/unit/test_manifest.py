"""The manifest format: round trip, strict parsing, dependency expansion."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bootenv.errors import UserError
from bootenv.manifest import (
    Blob,
    Chunk,
    Component,
    Manifest,
    ManifestError,
    OsImage,
    RootFs,
    Source,
    parse_manifest,
    resolve_components,
)


def blob(ch: str, suffix: str = "tar.zst") -> Blob:
    return Blob(file=f"{ch * 64}.{suffix}", sha256=ch * 64, size=10, raw_size=20)


def make_manifest() -> Manifest:
    os_image = OsImage(blob("a", "img.zst"), blob("b", "bmap.json"), ("base-files", "dpkg"), 100)
    comps = (
        Component("apache", blob("c"), ("apache2",), (), 10, ("apache2.service",)),
        Component("php", blob("d"), ("php",), ("apache",), 5, ()),
        Component(
            "mysql",
            blob("e"),
            ("mariadb-server",),
            (),
            7,
            ("mariadb.service",),
            (Chunk(0, 4, 5, "1" * 64), Chunk(4, 6, 15, "2" * 64, 4096, ("3" * 64,))),
        ),
    )
    return Manifest(
        Source("gold", "Debian GNU/Linux 12 (bookworm)", "amd64", "6.1.0-50-amd64", "2026-11-25T00:00:00Z"),
        RootFs("ext4", 1 << 30, 1 << 30, 4096),
        os_image,
        comps,
    )


def doc() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(make_manifest().to_json())
    return result


def test_round_trip() -> None:
    m = make_manifest()
    assert parse_manifest(m.to_json()) == m
    d = doc()
    assert "chunks" not in d["components"][0]  # one piece: no table
    assert [c["offset"] for c in d["components"][2]["chunks"]] == [0, 4]
    # Only a chunk checked block by block says so.
    assert "blocks" not in d["components"][2]["chunks"][0]
    assert d["components"][2]["chunks"][1]["blocks"] == ["3" * 64]


def test_pieces_of_an_unchunked_component_is_the_whole_blob() -> None:
    m = make_manifest()
    apache, mysql = m.component("apache"), m.component("mysql")
    assert apache.pieces() == (Chunk(0, 10, 20, "c" * 64),)
    assert mysql.pieces() == mysql.chunks
    assert parse_manifest(m.to_json().encode()) == m


def test_records_what_the_issue_asks_for() -> None:
    d = doc()
    assert d["format"] == "bootenv-composite" and d["version"] == 1
    assert set(d["source"]) == {"hostname", "os_release", "architecture", "kernel", "captured_at"}
    assert set(d["rootfs"]) == {"type", "image_size", "min_size", "block_size"}
    comp = d["components"][1]
    assert comp["depends"] == ["apache"] and comp["files"] == 5
    assert set(comp["data"]) == {"file", "sha256", "size", "raw_size"}


def edit(path: str, value: Any) -> str:
    d = doc()
    node: Any = d
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("version", 2, "unsupported manifest version 2"),
        ("format", "other", "not a bootenv composite image"),
        ("extra", 1, "unknown key 'extra' in manifest"),
        ("source.hostname", 5, "source.hostname must be str"),
        ("rootfs.min_size", -1, "must not be negative"),
        ("rootfs.image_size", True, "must be int"),
        ("rootfs.type", "xfs", "unsupported root filesystem"),
        ("os.files", KeyError, "missing key 'files' in os"),
        ("components.0.name", "../etc", "not a valid component name"),
        ("components.0.name", "mysql\n", "not a valid component name"),  # `$` matches before a \n
        ("components.2.chunks.0.sha256", "3" * 64 + "\n", "is not a sha256"),
        ("components.0.name", "php", "appears twice"),
        ("components.0.depends", ["php"], "cycle"),
        ("components.0.depends", ["nope"], "unknown component nope"),
        ("components.0.data.file", "../../etc/passwd", "named by its sha256"),
        ("components.0.data.sha256", "x" * 64, "named by its sha256"),
        ("components.0.packages", [1], "list of strings"),
        ("components", {}, "components must be list"),
        ("components.2.chunks.1.offset", 5, "does not follow the previous chunk"),
        ("components.2.chunks.1.size", 0, "does not follow the previous chunk"),
        ("components.2.chunks.1.size", 7, "do not add up to the archive's size"),
        ("components.2.chunks.1.raw_size", 1, "do not add up to the archive's size"),
        ("components.2.chunks.0.sha256", "zz", "is not a sha256"),
        ("components.2.chunks.0.extra", 1, "unknown key 'extra' in components[2].chunks[0]"),
        ("components.2.chunks", {}, "components[2].chunks must be list"),
        ("components.2.chunks.1.blocks", ["3" * 64] * 2, "components[2].chunks[1].blocks do not cover"),
        ("components.2.chunks.1.blocks", [], "blocks do not cover the chunk"),
        ("components.2.chunks.1.block_size", 100, "block_size must be 4096 to 67108864 bytes"),
        ("components.2.chunks.1.block_size", 1 << 27, "block_size must be 4096 to 67108864 bytes"),
        ("components.2.chunks.1.block_size", KeyError, "block_size must be 4096 to 67108864 bytes"),
        ("components.2.chunks.1.blocks", ["zz"], "not a sha256"),
        ("components.2.chunks.1.blocks", [1], "blocks must be a list of strings"),
        ("components.2.chunks.0.block_size", 4096, "components[2].chunks[0].blocks do not cover"),
    ],
)
def test_hostile_manifests(path: str, value: Any, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(edit(path, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "\xff", '{"format": 1}'])
def test_garbage(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(text)


def test_resolve_components() -> None:
    m = make_manifest()
    assert resolve_components(m, ["php"]) == (["apache", "php"], ["apache"])
    assert resolve_components(m, ["mysql"]) == (["mysql"], [])
    assert resolve_components(m, "all")[0] == ["apache", "php", "mysql"]
    assert resolve_components(m, "none") == ([], [])
    with pytest.raises(UserError, match="available: apache, php, mysql"):
        resolve_components(m, ["nginx"])


def _chain(n: int, *, cycle: bool = False) -> str:
    """A manifest whose components c0 .. c{n-1} each depend on the next (the last on c0
    if `cycle`)."""
    d = doc()
    template = d["components"][0]
    d["components"] = [
        {**template, "name": f"c{i}", "depends": [f"c{i + 1}"] if i + 1 < n else (["c0"] if cycle else [])}
        for i in range(n)
    ]
    return json.dumps(d)


def test_a_long_chain_of_dependencies_is_parsed_and_expanded() -> None:
    m = parse_manifest(_chain(5000))
    order, added = resolve_components(m, ["c0"])
    assert order == [f"c{i}" for i in reversed(range(5000))]
    assert added == order[:-1]
    with pytest.raises(ManifestError, match=r"^component dependencies form a cycle through c0$"):
        parse_manifest(_chain(5000, cycle=True))


@pytest.mark.parametrize(
    ("where", "value", "words"),
    [
        (
            "depends",
            "x\ny\x1b[31mRED",
            r"components[0].depends holds 'x\ny\x1b[31mRED', which is not a component",
        ),
        (
            "packages",
            "p\x1b]0;X\x07",
            r"components[0].packages holds 'p\x1b]0;X\x07', which is not a package",
        ),
        ("packages", "two words", "which is not a package name"),
        ("packages", "", "which is not a package name"),
        ("units", "u\x1b[2J.service", r"components[0].units holds 'u\x1b[2J.service', which is not a unit"),
        ("os.packages", "base\nbootenv: error: fake", "os.packages holds"),
    ],
)
def test_names_that_reach_error_lines_and_inspect_are_checked(where: str, value: str, words: str) -> None:
    d = doc()
    if where == "os.packages":
        d["os"]["packages"] = [value]
    else:
        d["components"][0][where] = [value]
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(d))
    msg = caught.value.message
    assert words in msg and "\n" not in msg and "\x1b" not in msg


def test_an_unsupported_root_filesystem_is_named_on_one_line() -> None:
    d = doc()
    d["rootfs"]["type"] = "ext4\nbootenv: error: fake"
    with pytest.raises(ManifestError, match="unsupported root filesystem 'ext4") as caught:
        parse_manifest(json.dumps(d))
    assert "\n" not in caught.value.message


def test_real_package_and_unit_names_still_parse() -> None:
    d = doc()
    d["components"][0]["packages"] = ["libstdc++6", "libc6:i386", "python3.11", "g++-12"]
    d["components"][0]["units"] = ["getty@tty1.service", "dev-disk-by\\x2dlabel-root.mount"]
    assert parse_manifest(json.dumps(d)).components[0].units[1] == "dev-disk-by\\x2dlabel-root.mount"
