"""Bad input an admin plausibly gives: one `bootenv: error:` line, exit 2, no traceback.

Each case was found by trying it (a CLI audit): before, it ended in a Python traceback,
a raw errno text, OpenSSL's internals, the wrong exit code, or six retries of a URL that
could never work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bootenv.cli import main
from bootenv.conflicts import RECORDS
from bootenv.journal import STATE_DIR, Journal
from bootenv.signing import keygen

Setup = Callable[[Path], list[str]]


def _layout(*extra: str) -> Setup:
    def argv(tmp: Path) -> list[str]:
        image = extra[0] if extra and extra[0].startswith("http") else str(tmp)
        rest = list(extra[1:] if extra and extra[0].startswith("http") else extra)
        return ["layout", "--image", image, "--components", "all", "--root", str(tmp), *rest]

    return argv


def _agent(tmp: Path) -> list[str]:
    (tmp / "cmdline").write_text("console=ttyS0 bootenv.image=http://[::1/x\n")
    return ["agent", "--cmdline", str(tmp / "cmdline")]


def _machines(tmp: Path) -> list[str]:
    """Re-assigning a machine reads its record (`bootenv machines` lists the others and
    warns of a damaged one: tests/unit/test_serve.py)."""
    (tmp / "state/machines").mkdir(parents=True)
    (tmp / "state/machines/52-54-00-00-00-01.json").write_bytes(b"\xff\xfe not utf-8")
    return ["assign", "52:54:00:00:00:01", "lamp", "--components", "all", "--state", str(tmp / "state")]


def _conflict(content: bytes) -> Setup:
    def argv(tmp: Path) -> list[str]:
        (tmp / RECORDS).mkdir(parents=True)
        (tmp / RECORDS / "0123456789ab.json").write_bytes(content)
        return ["conflicts", "list", "--root", str(tmp)]

    return argv


def _keygen(tmp: Path) -> list[str]:
    (tmp / "a-file").write_text("")  # a missing directory is made; one that is a file cannot be
    return ["keygen", "-o", str(tmp / "a-file/key")]


def _sign_with_pub(tmp: Path) -> list[str]:
    from tests.unit.test_signing import make_image

    keygen(tmp / "k")
    return ["sign", str(make_image(tmp / "img")), "--key", str(tmp / "k.pub")]


def _verify_bad_key(tmp: Path) -> list[str]:
    (tmp / "notakey.pub").write_text("ssh-rsa AAAAB3NzaC1yc2E= me@host\n")
    return ["verify", str(tmp), "--trust", str(tmp / "notakey.pub")]


def _resolve_missing_file(tmp: Path) -> list[str]:
    return ["conflicts", "resolve", "0123456789ab", "--file", str(tmp / "nofile"), "--root", str(tmp)]


def _assign(*extra: str) -> Setup:
    def argv(tmp: Path) -> list[str]:
        return ["assign", "52:54:00:00:00:01", "lamp", "--components", "mysql", "--state", str(tmp), *extra]

    return argv


CASES: dict[str, tuple[Setup, str]] = {
    "an unknown option before the verb": (lambda tmp: ["--bogus"], "unrecognized arguments: --bogus"),
    "no verb": (lambda tmp: [], "a VERB is required"),
    "assign an unknown kernel key": (_assign("--kernel-args", "bootenv.bogus=1"), "bootenv.bogus"),
    "assign the image twice": (_assign("--kernel-args", "bootenv.image=http://x/y"), "given twice"),
    "assign a bad host name": (_assign("--hostname", "bad_host"), "not a valid host name"),
    "assign single with some components": (_assign("--kernel-args", "bootenv.single=1"), "must be all"),
    "streams too many": (_layout("--streams", "99999999999999999999"), "--streams"),
    "streams negative": (_layout("--streams", "-1"), "--streams"),
    "retries too many": (_layout("--retries", "21"), "--retries"),
    "retries not a number": (_layout("--retries", "forever"), "--retries"),
    "broken IPv6 URL": (_layout("http://[::1/x"), "not a valid URL"),
    "port out of range": (_layout("http://127.0.0.1:99999/x"), "not a valid URL"),
    "callback not a URL": (_layout("--callback", "notaurl"), "--callback notaurl"),
    "agent URL": (_agent, "not an http(s) URL"),
    "machine record not UTF-8": (_machines, "is damaged"),
    "conflict record not JSON": (_conflict(b"{"), "is damaged"),
    "conflict record a list": (_conflict(b"[]"), "is damaged"),
    "conflict record missing a key": (_conflict(json.dumps({"id": "x"}).encode()), "is damaged"),
    "conflicts under no root": (lambda tmp: ["conflicts", "list", "--root", str(tmp / "nope")], "not a dir"),
    "keygen under a file": (_keygen, "cannot write"),
    "sign with the public key": (_sign_with_pub, "not an unencrypted PEM private key"),
    "verify with a key of another kind": (_verify_bad_key, "not a bootenv ed25519 public key"),
    "resolve with a missing file": (_resolve_missing_file, "no such file"),
    "resolve two ways at once": (
        lambda tmp: [*_resolve_missing_file(tmp), "--keep", "existing"],
        "not allowed with argument",
    ),
    "components with an empty name": (_layout("--components", "php,"), "--components php,"),
    "machines of a state dir that is not there": (
        lambda tmp: ["machines", "--state", str(tmp / "typo")],
        "is not a state directory",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, words = CASES[case]
    assert main(setup(tmp_path)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bootenv: error:")]
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err and "Errno" not in err and "OpenSSL" not in err
    assert not (tmp_path / "machines").exists() or not list((tmp_path / "machines").iterdir())
    assert not (tmp_path / "typo").exists()


def test_a_damaged_journal_entry_counts_as_not_done(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    (tmp_path / STATE_DIR / "php.json").write_text("[]")
    assert journal.phase("php", "0" * 64) is None


def test_serve_refuses_a_broken_public_url_and_a_catalog_not_in_utf8(tmp_path: Path) -> None:
    from bootenv.catalog import CatalogError, load_catalog
    from bootenv.errors import UserError
    from bootenv.serve import check_public_url

    with pytest.raises(UserError, match="expected http"):
        check_public_url("http://[::1")
    (tmp_path / "catalog.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CatalogError, match="cannot read the catalog"):
        load_catalog(tmp_path)
