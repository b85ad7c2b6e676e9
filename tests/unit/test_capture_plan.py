"""Capture's pure helpers: --auto proposals and quiescing (with a recording run helper)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv import run as run_mod
from bootenv.capture import _quiesced, propose_components
from bootenv.dpkg import read_database
from bootenv.errors import FatalError
from tests.unit.fakeroot import make_tree


def test_auto_proposes_service_packages_outside_the_base(tmp_path: Path) -> None:
    db = read_database(make_tree(tmp_path / "g"))
    names = {(s.name, s.packages) for s in propose_components(db, ())}
    assert names == {("httpd", ("httpd",)), ("dbserver", ("dbserver",))}


def test_quiesce_stops_and_always_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def record(argv: list[str], **_: object) -> object:
        calls.append(argv[1:])

        class Done:
            returncode = 0
            stdout = b""
            stderr = b""

        return Done()

    monkeypatch.setattr(run_mod, "_spawn", record)
    with pytest.raises(FatalError), _quiesced(("mariadb", "apache2")):
        raise FatalError("disk full")
    assert calls == [
        ["stop", "mariadb"],
        ["stop", "apache2"],
        ["start", "apache2"],
        ["start", "mariadb"],
    ]


def test_the_recorded_kernel_is_the_newest_by_version(tmp_path: Path) -> None:
    from bootenv.capture import _source
    from bootenv.dpkg import Database

    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"):
        (tmp_path / "lib/modules" / version).mkdir(parents=True)
    assert _source(tmp_path, Database({}, {}, (), {})).kernel == "6.1.0-10-amd64"
