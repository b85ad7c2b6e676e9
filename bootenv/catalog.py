"""The admin's catalog: which image x component combinations the boot menu offers.

A catalog is a JSON or TOML file (by suffix) with these keys, and no others:

    title = "ACME datacenter"          # optional menu title
    timeout = 10                       # seconds before the default is booted; 0 waits forever
    default = "lamp-mysql"             # an entry id, or "local" (boot from local disk)
    [[entries]]
    id = "lamp-mysql"                  # optional: derived from image and components
    title = "LAMP: OS + MySQL"
    image = "lamp"                     # a directory under --images holding manifest.json
    components = ["mysql"]             # or "all", "none", "a,b"
    kernel_args = ""                   # optional extra kernel arguments for the ramdisk

Without a catalog file, `serve` looks for DIR/catalog.json or DIR/catalog.toml, and
otherwise offers, for each image, "OS only", "OS + <component>" each, and "all".
Every image and component named is checked against the image's manifest when loaded.
No two entries of a catalog share an id: the menu chains to /ipxe/select/<id>.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootenv import ipxetext
from bootenv.errors import UserError
from bootenv.machines import check_boot_args, check_components, check_image
from bootenv.manifest import MANIFEST, Manifest, parse_manifest
from bootenv.smallfile import read_capped
from bootenv.source import read_manifest_file

log = logging.getLogger(__name__)

LOCAL = "local"
MAX_CATALOG = 1 << 20  # bytes: a catalog of thousands of entries is a fraction of it
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TOP = {"title": str, "timeout": (int, float), "default": str, "entries": list}
_ENTRY = {"id": str, "title": str, "image": str, "components": (str, list), "kernel_args": str}


class CatalogError(UserError):
    """The catalog file is malformed or names an image or component that doesn't exist."""


@dataclass(frozen=True)
class Entry:
    id: str
    title: str
    image: str
    components: str  # "all", "none" or "a,b"
    kernel_args: str = ""


@dataclass(frozen=True)
class Catalog:
    entries: tuple[Entry, ...]
    default: str = LOCAL  # an entry id or "local"
    timeout: float = 10.0  # seconds; 0 waits for a key press
    title: str = "bootenv: choose what to install"

    def __post_init__(self) -> None:
        # A menu item chains to its entry's id, and `entry` takes the first match: the
        # second of two entries with one id would install the first's image.
        why = _id_problem([e.id for e in self.entries])
        if why is not None:
            raise CatalogError(f"catalog: {why}")

    def entry(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise CatalogError(f"no catalog entry {entry_id!r}")


def load_catalog(images: Path, path: Path | None = None) -> Catalog:
    """The catalog from `path`, DIR/catalog.{json,toml}, or generated from the images."""
    if path is None:
        for name in ("catalog.json", "catalog.toml"):
            if (images / name).is_file():
                path = images / name
                break
    if path is None:
        return default_catalog(images)
    try:
        data = read_capped(path, MAX_CATALOG)
        text = data.decode()
    except (OSError, ValueError, UserError) as exc:  # ValueError: not UTF-8; UserError: not a file
        raise CatalogError(f"cannot read the catalog {path}: {_reason(exc)}") from exc
    if len(data) > MAX_CATALOG:
        raise CatalogError(f"the catalog {path} is larger than {MAX_CATALOG >> 20} MiB")
    catalog = parse_catalog(text, toml=path.suffix == ".toml", where=str(path))
    check_catalog(catalog, images)
    return catalog


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not a regular file" if isinstance(exc, UserError) else str(exc)


def parse_catalog(text: str, *, toml: bool = False, where: str = "catalog") -> Catalog:
    try:
        doc: Any = tomllib.loads(text) if toml else json.loads(text)
    except (ValueError, RecursionError, tomllib.TOMLDecodeError) as exc:  # Recursion: nested too deep
        raise CatalogError(f"{where} is not valid {'TOML' if toml else 'JSON'}: {exc}") from exc
    _keys(doc, _TOP, {"entries"}, where)
    entries = tuple(_entry(e, i, where) for i, e in enumerate(doc["entries"]))
    ids = [e.id for e in entries]
    why = _id_problem(ids)
    if why is not None:
        raise CatalogError(f"{where}: {why}")
    # Without one, an unknown machine boots from its disk: none is wiped without a choice.
    default = doc.get("default", LOCAL)
    if default != LOCAL and default not in ids:
        raise CatalogError(f"{where}: default {default!r} is not an entry id or 'local'")
    timeout = doc.get("timeout", 10)
    # Compared before float(): a 400-digit integer overflows a float, and NaN fails here.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
        raise CatalogError(f"{where}: timeout must be a number between 0 and 3600 (seconds)")
    title = doc.get("title", Catalog.title)
    _check_title(title, where)
    return Catalog(entries, default, float(timeout), title)


def _id_problem(ids: Sequence[str]) -> str | None:
    """Why these entry ids cannot make one menu (one used twice, or 'local'), or None."""
    counts = Counter(ids)
    dup = next((i for i in ids if counts[i] > 1), None)
    if dup is not None or LOCAL in counts:
        return f"entry id {dup or LOCAL!r} is used twice or reserved"
    return None


def _check_title(title: str, where: str) -> None:
    """A title goes into an iPXE `menu` or `item` line."""
    if not 1 <= len(title) <= 80:
        raise CatalogError(f"{where}: the title must be 1 to 80 characters")
    why = ipxetext.problem(title)
    if why is not None:
        raise CatalogError(f"{where}: the title {why}: it goes into an iPXE menu")


def _keys(doc: object, spec: dict[str, Any], required: set[str], where: str) -> None:
    if not isinstance(doc, dict):
        raise CatalogError(f"{where} must be an object")
    unknown = set(doc) - set(spec)
    if unknown:
        raise CatalogError(f"{where}: unknown key {sorted(unknown)[0]!r}", hint=f"known: {', '.join(spec)}")
    for key in required - set(doc):
        raise CatalogError(f"{where}: missing key {key!r}")
    for key, typ in spec.items():
        if key in doc and (not isinstance(doc[key], typ) or isinstance(doc[key], bool)):
            raise CatalogError(f"{where}: {key} has the wrong type")


def _entry(doc: object, index: int, where: str) -> Entry:
    here = f"{where}: entries[{index}]"
    _keys(doc, _ENTRY, {"title", "image", "components"}, here)
    assert isinstance(doc, dict)
    comps = doc["components"]
    if isinstance(comps, list):
        if not comps or not all(isinstance(c, str) for c in comps):
            raise CatalogError(f"{here}: components must be a non-empty list of names, 'all' or 'none'")
        comps = ",".join(comps)
    try:
        image = check_image(doc["image"])
        comps = check_components(comps)
    except UserError as exc:
        raise CatalogError(f"{here}: {exc.message}") from exc
    entry_id = doc.get("id") or _slug(f"{image}-{comps}")
    if not _ID.fullmatch(entry_id):
        raise CatalogError(f"{here}: id {entry_id!r} must be lowercase letters, digits, - and _")
    _check_title(doc["title"], here)
    kernel_args = doc.get("kernel_args", "")
    why = ipxetext.problem(kernel_args)
    if why is not None:
        raise CatalogError(f"{here}: kernel_args {why}: they go into an iPXE script")
    try:
        check_boot_args(image, comps, None, kernel_args)
    except UserError as exc:
        raise CatalogError(f"{here}: kernel_args: {exc.message}") from exc
    return Entry(entry_id, doc["title"], image, comps, kernel_args)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")[:63] or "entry"


def _manifest(images: Path, image: str) -> Manifest:
    path = images / image / MANIFEST
    try:
        return parse_manifest(read_manifest_file(path))
    except FileNotFoundError:
        raise CatalogError(f"image {image!r} not found: no {path}") from None


def check_catalog(catalog: Catalog, images: Path) -> None:
    """Every local image exists and has the components its entries name."""
    for e in catalog.entries:
        if e.image.startswith(("http://", "https://")):
            continue  # served from elsewhere (a CDN or nginx); checked by the agent
        manifest = _manifest(images, e.image)
        if e.components not in ("all", "none"):
            for name in e.components.split(","):
                try:
                    manifest.component(name)
                except UserError as exc:
                    raise CatalogError(f"catalog entry {e.id!r}: {exc}") from exc


def default_catalog(images: Path) -> Catalog:
    """One entry per image for the OS alone, each component, and all components."""
    offers: list[tuple[str, str, str]] = []  # image, components, title
    dirs = sorted(p for p in images.iterdir() if (p / MANIFEST).is_file()) if images.is_dir() else []
    for d in dirs:
        name = d.name
        try:
            manifest = _manifest(images, check_image(name))
        except UserError as exc:  # a name iPXE can't carry, or a broken image: not offered
            log.warning("image %s is left out of the menu: %s", name, exc)
            continue
        offers.append((name, "none", f"{name}: OS only"))
        offers += [(name, c.name, f"{name}: OS + {c.name}") for c in manifest.components]
        if manifest.components:
            offers.append((name, "all", f"{name}: all"))
    ids = _generated_ids([(image, comps) for image, comps, _ in offers])
    entries = (Entry(i, title, image, comps) for i, (image, comps, title) in zip(ids, offers, strict=True))
    return Catalog(tuple(entries), default=LOCAL)


def _generated_ids(offers: Sequence[tuple[str, str]]) -> list[str]:
    """Each offer's id: IMAGE-COMPONENT as a slug, unless another offer has the same slug
    (`rack` + `db-main` and `rack-db` + `main`, `Deb12` and `deb12`, `web.1` and `web-1`,
    two long names cut at the same place). Those get a hash of their own image and
    component instead, so an id depends only on the images there are, never on the order
    a directory lists them in, and names one offer (a hashed id that is some other
    offer's slug sends that one to its hash too)."""
    ids = [_slug(f"{image}-{comps}") for image, comps in offers]
    hashed = [_hashed_id(image, comps) for image, comps in offers]
    while True:
        counts = Counter(ids)
        clashing = [n for n, i in enumerate(ids) if counts[i] > 1 and i != hashed[n]]
        if not clashing:
            return ids  # unique, unless two hashes clash: Catalog refuses that
        for n in clashing:
            ids[n] = hashed[n]


def _hashed_id(image: str, comps: str) -> str:
    # No image or component name holds a '/', so the hashed text names one offer.
    digest = hashlib.sha256(f"{image}/{comps}".encode()).hexdigest()[:8]
    return f"{_slug(f'{image}-{comps}')[:54].rstrip('-')}-{digest}"
