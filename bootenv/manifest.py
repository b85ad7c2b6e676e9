"""The composite image manifest (format v1): frozen dataclasses and a strict parser.

The manifest is the one file a provisioner trusts first: every sub-image is pinned by
size and sha256, and the file names are content hashes. See docs/FORMAT.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bootenv.errors import UserError

FORMAT = "bootenv-composite"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST = 16 << 20
MAX_CHUNKS = 1 << 16
MIN_BLOCK = 4096  # the smallest and largest block a chunk's blocks may pin (a block is
MAX_BLOCK = 64 << 20  # held in memory until it is checked)
_HEX = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[0-9a-f]{64}\.[a-z]+(\.[a-z]+)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A package or unit name: printable ASCII without a space (Debian's package names and
# systemd's unit names are narrower still). They reach error lines and `inspect`.
_WORD = re.compile(r"[!-~]{1,255}")


class ManifestError(UserError):
    """The manifest is malformed, or from a format this bootenv does not know."""


@dataclass(frozen=True)
class Blob:
    """A file of the composite image, pinned by its content hash."""

    file: str
    sha256: str
    size: int  # bytes of the file as stored (compressed)
    raw_size: int  # bytes after decompression


@dataclass(frozen=True)
class Source:
    hostname: str
    os_release: str
    architecture: str
    kernel: str
    captured_at: str


@dataclass(frozen=True)
class RootFs:
    type: str
    image_size: int  # size of the filesystem image (the OS sub-image before growing)
    min_size: int  # smallest partition the image fits in
    block_size: int


@dataclass(frozen=True)
class OsImage:
    data: Blob  # zstd stream of the mapped ranges, in offset order
    blockmap: Blob  # JSON block map (see blockmap.py)
    packages: tuple[str, ...]
    files: int


@dataclass(frozen=True)
class Chunk:
    """One independently fetchable piece of a component archive: a whole zstd frame
    holding whole tar members, at `offset` in the blob."""

    offset: int
    size: int  # compressed bytes (the HTTP range)
    raw_size: int  # tar bytes after decompression
    sha256: str  # of the compressed bytes
    # A large chunk also pins each `block_size` bytes of it (the last block may be
    # shorter): layout checks them as they arrive and lays out what is in meanwhile.
    block_size: int = 0
    blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Component:
    name: str
    data: Blob  # zstd-compressed pax tar archive
    packages: tuple[str, ...]
    depends: tuple[str, ...]
    files: int
    units: tuple[str, ...]  # systemd units enabled on the gold machine
    chunks: tuple[Chunk, ...] = ()  # empty: the archive is one piece

    def pieces(self) -> tuple[Chunk, ...]:
        """The units a layout stream fetches: the chunks, or the whole blob as one."""
        return self.chunks or (Chunk(0, self.data.size, self.data.raw_size, self.data.sha256),)


@dataclass(frozen=True)
class Manifest:
    source: Source
    rootfs: RootFs
    os: OsImage
    components: tuple[Component, ...]
    single: OsImage | None = None  # the classic homogeneous image, if captured

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        names = ", ".join(c.name for c in self.components) or "none"
        raise UserError(f"unknown component {name!r}", hint=f"available: {names}")

    def blobs(self) -> list[Blob]:
        out = [self.os.data, self.os.blockmap] + [c.data for c in self.components]
        if self.single:
            out += [self.single.data, self.single.blockmap]
        return out

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        if self.single is None:
            del body["single"]
        for comp in body["components"]:
            if not comp["chunks"]:
                del comp["chunks"]
            for chunk in comp.get("chunks", ()):
                if not chunk["blocks"]:
                    del chunk["block_size"], chunk["blocks"]
        return json.dumps(body, indent=2, sort_keys=False) + "\n"


def valid_name(name: str) -> bool:
    """Whether `name` may name a component."""
    return bool(_NAME.fullmatch(name)) and name not in ("os", "all", "none")


def parse_manifest(text: str | bytes) -> Manifest:
    """Parse and validate a manifest; any problem is a one-line ManifestError."""
    if len(text) > MAX_MANIFEST:
        raise ManifestError(f"manifest is larger than {MAX_MANIFEST >> 20} MiB")
    try:
        doc = json.loads(text)
    except RecursionError as exc:
        raise ManifestError("manifest is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be an object")
    # Format and version first: a newer manifest should say so, not "unknown key".
    if doc.get("format") != FORMAT:
        raise ManifestError(f"not a bootenv composite image (format {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise ManifestError(
            f"unsupported manifest version {doc.get('version')!r}",
            hint=f"this bootenv reads version {VERSION}",
        )
    doc = _obj(
        doc,
        "manifest",
        {"format": str, "version": int, "source": dict, "rootfs": dict, "os": dict, "components": list},
        {"single": dict},
    )
    source = Source(**_obj(doc["source"], "source", {f: str for f in Source.__dataclass_fields__}))
    rootfs = RootFs(
        **_obj(doc["rootfs"], "rootfs", {"type": str, "image_size": int, "min_size": int, "block_size": int})
    )
    if rootfs.type != "ext4" or rootfs.block_size not in (1024, 2048, 4096):
        raise ManifestError(f"unsupported root filesystem {rootfs.type[:40]!r}/{rootfs.block_size}")
    if not rootfs.min_size > 0 or rootfs.image_size < rootfs.min_size:
        raise ManifestError("rootfs sizes are inconsistent")
    components = tuple(_component(c, i) for i, c in enumerate(doc["components"]))
    _check_components(components)
    single = _os_image(doc["single"], "single") if "single" in doc else None
    return Manifest(source, rootfs, _os_image(doc["os"], "os"), components, single)


def _obj(
    value: Any, where: str, required: dict[str, type], optional: dict[str, type] | None = None
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be an object")
    optional = optional or {}
    unknown = set(value) - set(required) - set(optional)
    if unknown:
        raise ManifestError(f"unknown key {sorted(unknown)[0]!r} in {where}")
    for key, typ in {**required, **optional}.items():
        if key not in value:
            if key in required:
                raise ManifestError(f"missing key {key!r} in {where}")
            continue
        ok = isinstance(value[key], typ) and not (typ is int and isinstance(value[key], bool))
        if not ok:
            raise ManifestError(f"{where}.{key} must be {typ.__name__}")
        if typ is int and value[key] < 0:
            raise ManifestError(f"{where}.{key} must not be negative")
    return value


def _blob(value: Any, where: str) -> Blob:
    d = _obj(value, where, {"file": str, "sha256": str, "size": int, "raw_size": int})
    if (
        not _HEX.fullmatch(d["sha256"])
        or not _FILE.fullmatch(d["file"])
        or not d["file"].startswith(d["sha256"])
    ):
        raise ManifestError(f"{where} must be named by its sha256 (got {d['file']!r})")
    return Blob(**d)


def _strings(value: list[Any], where: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where} must be a list of strings")
    return tuple(value)


def _names(value: list[Any], where: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    """A list of strings each `pattern` matches whole: names that reach error lines and
    `inspect`, where a newline or a terminal escape would forge or hide text."""
    out = _strings(value, where)
    for v in out:
        if not pattern.fullmatch(v):
            raise ManifestError(f"{where} holds {v[:80]!r}, which is not {what}")
    return out


def _os_image(value: Any, where: str) -> OsImage:
    d = _obj(value, where, {"data": dict, "blockmap": dict, "packages": list, "files": int})
    return OsImage(
        _blob(d["data"], f"{where}.data"),
        _blob(d["blockmap"], f"{where}.blockmap"),
        _names(d["packages"], f"{where}.packages", _WORD, "a package name"),
        d["files"],
    )


def _component(value: Any, index: int) -> Component:
    where = f"components[{index}]"
    d = _obj(
        value,
        where,
        {"name": str, "data": dict, "packages": list, "depends": list, "files": int, "units": list},
        {"chunks": list},
    )
    if not valid_name(d["name"]):
        raise ManifestError(f"{where}.name {d['name']!r} is not a valid component name")
    data = _blob(d["data"], f"{where}.data")
    return Component(
        d["name"],
        data,
        _names(d["packages"], f"{where}.packages", _WORD, "a package name"),
        _names(d["depends"], f"{where}.depends", _NAME, "a component name"),
        d["files"],
        _names(d["units"], f"{where}.units", _WORD, "a unit name"),
        _chunks(d.get("chunks", []), data, f"{where}.chunks"),
    )


def _chunks(value: list[Any], data: Blob, where: str) -> tuple[Chunk, ...]:
    """Chunks tile the blob exactly: in order, contiguous, none empty."""
    if len(value) > MAX_CHUNKS:
        raise ManifestError(f"{where} has more than {MAX_CHUNKS} chunks")
    out = []
    offset = raw = 0
    for i, item in enumerate(value):
        d = dict(
            _obj(
                item,
                f"{where}[{i}]",
                {"offset": int, "size": int, "raw_size": int, "sha256": str},
                {"block_size": int, "blocks": list},
            )
        )
        blocks = _strings(d.pop("blocks", []), f"{where}[{i}].blocks")
        c = Chunk(**d, blocks=blocks)
        if not _HEX.fullmatch(c.sha256):
            raise ManifestError(f"{where}[{i}].sha256 is not a sha256")
        if c.offset != offset or c.size == 0:
            raise ManifestError(f"{where}[{i}] does not follow the previous chunk")
        _check_blocks(c, f"{where}[{i}]")
        offset += c.size
        raw += c.raw_size
        out.append(c)
    if out and (offset != data.size or raw != data.raw_size):
        raise ManifestError(f"{where} do not add up to the archive's size")
    return tuple(out)


def _check_blocks(c: Chunk, where: str) -> None:
    """A chunk's blocks, if any, cover it exactly: ceil(size / block_size) sha256s."""
    if not c.blocks and not c.block_size:
        return
    if not MIN_BLOCK <= c.block_size <= MAX_BLOCK:
        raise ManifestError(f"{where}.block_size must be {MIN_BLOCK} to {MAX_BLOCK} bytes")
    if len(c.blocks) != -(-c.size // c.block_size):
        raise ManifestError(f"{where}.blocks do not cover the chunk")
    if not all(_HEX.fullmatch(b) for b in c.blocks):
        raise ManifestError(f"{where}.blocks holds something that is not a sha256")


def _check_components(components: tuple[Component, ...]) -> None:
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ManifestError("a component name appears twice")
    graph = {c.name: c.depends for c in components}
    for comp in components:
        for dep in comp.depends:
            if dep not in graph:
                raise ManifestError(f"component {comp.name} depends on unknown component {dep}")
    _dependency_order(sorted(graph), graph.__getitem__)


def _dependency_order(starts: Iterable[str], depends: Callable[[str], Iterable[str]]) -> list[str]:
    """`starts` and all they depend on, each after its dependencies: depth first, with a
    stack of its own (a chain of thousands of dependencies would overflow Python's).
    ManifestError on a cycle."""
    done: dict[str, None] = {}  # ordered
    for start in starts:
        if start in done:
            continue
        on_path = {start}
        stack = [(start, iter(depends(start)))]
        while stack:
            name, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                on_path.discard(name)
                done.setdefault(name)
            elif dep in on_path:
                raise ManifestError(f"component dependencies form a cycle through {dep}")
            elif dep not in done:
                on_path.add(dep)
                stack.append((dep, iter(depends(dep))))
    return list(done)


def resolve_components(manifest: Manifest, wanted: str | list[str]) -> tuple[list[str], list[str]]:
    """Expand `all`, `none` or a list of names with their dependencies.

    Returns (components in dependency order, the ones added as dependencies).
    """
    if wanted == "all":
        names = [c.name for c in manifest.components]
    elif wanted == "none":
        names = []
    else:
        names = list(wanted)
    order = _dependency_order(names, lambda name: manifest.component(name).depends)
    added = [n for n in order if n not in names]
    return order, added
