"""The generated catalog's entry ids: one per offer, the same on every start."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootenv.catalog import LOCAL, Catalog, CatalogError, Entry, default_catalog, parse_catalog
from bootenv.serve import ServeConfig, running
from bootenv.state import Store
from tests.serveimage import make_image

# Pairs a reviewer found sharing an id: each one's second entry installed the first's image.
CLASHES: dict[str, dict[str, int]] = {
    "rack": {"db-main": 1000},
    "rack-db": {"main": 1000},
    "Deb12": {},
    "deb12": {},
    "web.1": {},
    "web-1": {},
}
ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # what a catalog file's ids must match


def _images(root: Path, images: dict[str, dict[str, int]]) -> Path:
    for seed, (name, comps) in enumerate(images.items()):
        make_image(root, name, comps, seed=seed)
    return root


def _offers(catalog: Catalog) -> dict[str, tuple[str, str]]:
    return {e.id: (e.image, e.components) for e in catalog.entries}


def test_every_generated_entry_has_an_id_of_its_own(tmp_path: Path) -> None:
    catalog = default_catalog(_images(tmp_path, CLASHES))
    ids = [e.id for e in catalog.entries]
    assert len(set(ids)) == len(ids) == 10
    for e in catalog.entries:
        assert catalog.entry(e.id) == e  # choosing an item installs that item
        assert ID.fullmatch(e.id)
    # An id nothing else wants stays readable; the clashing ones keep it as a prefix.
    offers = _offers(catalog)
    for plain in ("rack-none", "rack-all", "rack-db-none", "rack-db-all"):
        assert plain in offers
    by_offer = {v: k for k, v in offers.items()}
    for offer, prefix in [
        (("rack", "db-main"), "rack-db-main-"),
        (("rack-db", "main"), "rack-db-main-"),
        (("Deb12", "none"), "deb12-none-"),
        (("deb12", "none"), "deb12-none-"),
        (("web.1", "none"), "web-1-none-"),
        (("web-1", "none"), "web-1-none-"),
    ]:
        assert re.fullmatch(re.escape(prefix) + "[0-9a-f]{8}", by_offer[offer])


def test_generated_ids_do_not_depend_on_the_directory_listing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images(tmp_path, CLASHES)
    first = _offers(default_catalog(images))
    assert _offers(default_catalog(images)) == first  # the next start
    listed = Path.iterdir

    def backwards(self: Path) -> Iterator[Path]:
        return iter(sorted(listed(self), reverse=True))

    monkeypatch.setattr(Path, "iterdir", backwards)
    assert _offers(default_catalog(images)) == first


def test_an_id_hashed_for_one_offer_is_not_left_as_another_offers_id(tmp_path: Path) -> None:
    hashed = {v: k for k, v in _offers(default_catalog(_images(tmp_path / "a", CLASHES))).items()}
    taken = hashed[("rack", "db-main")]  # rack-db-main-XXXXXXXX
    # rack-db's component main-XXXXXXXX slugs to that very id.
    images = {**CLASHES, "rack-db": {"main": 1000, taken.removeprefix("rack-db-"): 1000}}
    catalog = default_catalog(_images(tmp_path / "b", images))
    ids = [e.id for e in catalog.entries]
    assert len(set(ids)) == len(ids)
    assert catalog.entry(taken) == Entry(taken, "rack: OS + db-main", "rack", "db-main")


def test_long_image_names_cut_at_the_same_place_get_ids_of_their_own(tmp_path: Path) -> None:
    stem = "a" * 70
    catalog = default_catalog(_images(tmp_path, {stem + "1": {"web": 1000, "db": 1000}, stem + "2": {}}))
    ids = [e.id for e in catalog.entries]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(ID.fullmatch(i) for i in ids)


@pytest.mark.parametrize("ids", [("a", "a"), ("a", LOCAL)])
def test_a_catalog_with_an_id_twice_or_local_is_refused_however_it_is_made(ids: tuple[str, ...]) -> None:
    entries = tuple(Entry(i, "x", "lamp", "all") for i in ids)
    with pytest.raises(CatalogError, match="used twice or reserved"):
        Catalog(entries)


def test_a_catalog_file_whose_derived_ids_clash_is_refused() -> None:
    doc = """
[[entries]]
title = "rack: OS + db-main"
image = "rack"
components = "db-main"
[[entries]]
title = "rack-db: OS + main"
image = "rack-db"
components = "main"
"""
    with pytest.raises(CatalogError, match="entry id 'rack-db-main' is used twice"):
        parse_catalog(doc, toml=True)


def test_each_menu_item_of_a_generated_catalog_installs_what_it_says(tmp_path: Path) -> None:
    images, boot = tmp_path / "images", tmp_path / "boot"
    _images(images, CLASHES)
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"K")
    (boot / "initramfs.img").write_bytes(b"I")
    config = ServeConfig(images=images, state=tmp_path / "state", port=0, boot=boot)
    with running(config) as srv:

        def get(path: str) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                assert resp.status == 200
                return resp.read().decode()
            finally:
                conn.close()

        menu = get("/ipxe/machine?mac=52:54:00:00:00:01")
        titles = dict(re.findall(r"^item (e\d+) (.*)$", menu, re.M))
        chains = dict(re.findall(r"^:(e\d+)\nchain \S+(/ipxe/select/[^?]+)\?", menu, re.M))
        assert len(titles) == len(chains) == 10
        for n, label in enumerate(sorted(titles)):
            mac = f"52:54:00:00:01:{n:02x}"
            get(f"{chains[label]}?mac={mac}")
            machine = Store(config.state).get(mac)
            assert machine is not None
            image, _, what = titles[label].partition(": ")
            components = {"OS only": "none", "all": "all"}.get(what, what.removeprefix("OS + "))
            assert (machine.image, machine.components) == (image, components), titles[label]
