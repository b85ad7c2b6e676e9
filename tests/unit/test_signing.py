"""Ed25519 manifest signatures: good, tampered, untrusted, unsigned, insecure."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from bootenv.errors import UserError, VerificationError
from bootenv.signing import Trust, keygen, parse_fingerprint, read_public_key, sign, verify

MANIFEST = b'{"format": "bootenv-composite", "version": 1}\n'


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    keygen(path)
    return path


def test_keygen_files(key: Path) -> None:
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(read_public_key(key.with_name("key.pub"))) == 32
    with pytest.raises(UserError, match="already exists"):
        keygen(key)


def test_keygen_makes_a_missing_directory_private(tmp_path: Path) -> None:
    """The quick start's `keygen -o /etc/bootenv/signing-key`, on a machine with no /etc/bootenv."""
    key = tmp_path / "etc/bootenv/signing-key"
    keygen(key)
    assert key.parent.stat().st_mode & 0o777 == 0o700 and key.stat().st_mode & 0o777 == 0o600
    assert len(read_public_key(key.with_name("signing-key.pub"))) == 32


def test_good_signature_by_key_and_by_fingerprint(key: Path) -> None:
    pub = read_public_key(key.with_name("key.pub"))
    sig = sign(MANIFEST, key)
    fp = verify(MANIFEST, sig, Trust(keys=(pub,)))
    assert fp is not None and fp.startswith("sha256:")
    assert verify(MANIFEST, sig, Trust(fingerprints=(fp,))) == fp


def test_tampered_manifest_is_refused(key: Path) -> None:
    pub = read_public_key(key.with_name("key.pub"))
    sig = sign(MANIFEST, key)
    with pytest.raises(VerificationError, match="altered"):
        verify(MANIFEST.replace(b"1", b"2"), sig, Trust(keys=(pub,)))


def test_untrusted_key_is_refused(key: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keygen(other)
    sig = sign(MANIFEST, other)
    with pytest.raises(VerificationError, match="untrusted key"):
        verify(MANIFEST, sig, Trust(keys=(read_public_key(key.with_name("key.pub")),)))


def test_swapped_public_key_in_signature_file_is_refused(key: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keygen(other)
    doc = json.loads(sign(MANIFEST, other))
    doc["public_key"] = json.loads(sign(MANIFEST, key))["public_key"]
    with pytest.raises(VerificationError, match="altered"):
        verify(MANIFEST, json.dumps(doc).encode(), Trust(keys=(read_public_key(key.with_name("key.pub")),)))


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"{}",
        b"[1]",
        b'{"algorithm":"rsa","public_key":"","signature":""}',
        b"[" * 4000,  # nested deeper than the JSON parser recurses
        b"[" * 100_000,  # and far larger than a signature
        b'{"algorithm":"ed25519","public_key":"","signature":"' + b"A" * 8192 + b'"}',
    ],
)
def test_malformed_signature(bad: bytes, key: Path) -> None:
    with pytest.raises(VerificationError, match=r"^manifest.json.sig is malformed$"):
        verify(MANIFEST, bad, Trust(keys=(read_public_key(key.with_name("key.pub")),)))


def test_unsigned_is_refused_unless_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(VerificationError, match="not signed"):
        verify(MANIFEST, None, Trust(keys=(b"x" * 32,)))
    with caplog.at_level(logging.WARNING):
        assert verify(MANIFEST, None, Trust(insecure=True)) is None
    assert "INSECURE" in caplog.text


def test_insecure_lets_through_only_what_no_trusted_key_could_check(key: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keygen(other)
    sig = sign(MANIFEST, other)
    assert verify(MANIFEST, sig, Trust(insecure=True)) is None  # nothing trusted: not checked
    with pytest.raises(UserError, match="no trusted key"):
        verify(MANIFEST, sig, Trust())
    trusted = Trust(keys=(read_public_key(key.with_name("key.pub")),), insecure=True)
    with pytest.raises(VerificationError, match="untrusted key"):
        verify(MANIFEST, sig, trusted)
    with pytest.raises(VerificationError, match="altered"):
        verify(MANIFEST.replace(b"1", b"2"), sign(MANIFEST, key), trusted)


def test_fingerprint_parsing() -> None:
    assert parse_fingerprint("SHA256:" + "A" * 64) == "sha256:" + "a" * 64
    with pytest.raises(UserError):
        parse_fingerprint("sha256:xyz")


def make_image(directory: Path) -> Path:
    """A small but real composite image: blobs on disk, named by their hashes."""
    from bootenv.manifest import Component, Manifest, OsImage, RootFs, Source
    from bootenv.store import write_blob

    directory.mkdir()
    os_image = OsImage(
        write_blob(directory, "img.zst", b"os"), write_blob(directory, "bmap.json", b"{}"), (), 1
    )
    comp = Component("web", write_blob(directory, "tar.zst", b"web"), ("httpd",), (), 1, ())
    m = Manifest(
        Source("g", "Debian", "amd64", "6.1", "now"), RootFs("ext4", 4096, 4096, 4096), os_image, (comp,)
    )
    (directory / "manifest.json").write_text(m.to_json())
    return directory


def test_cli_sign_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bootenv.cli import main

    image = make_image(tmp_path / "img")
    key = tmp_path / "k"
    assert main(["keygen", "-o", str(key)]) == 0
    trust = ["--trust", str(key) + ".pub"]
    assert main(["verify", str(image), *trust]) == 4  # unsigned
    assert "not signed" in capsys.readouterr().err
    assert main(["verify", str(image), "--insecure"]) == 0
    out, err = capsys.readouterr()
    assert "INSECURE" in err and "manifest NOT verified (--insecure); 3 blobs match the manifest" in out
    assert main(["sign", str(image), "--key", str(key)]) == 0
    assert main(["verify", str(image), *trust]) == 0
    assert "manifest and 3 blobs verified" in capsys.readouterr().out
    # A blob altered on the server is caught by its pinned hash.
    blob = next(image.glob("*.tar.zst"))
    blob.write_bytes(b"WEB")
    assert main(["verify", str(image), *trust]) == 4
    assert "does not match the manifest" in capsys.readouterr().err
    # An altered manifest is caught by the signature.
    manifest = image / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"httpd"', '"evil"'))
    assert main(["verify", str(image), *trust, "--manifest-only"]) == 4
    assert "altered" in capsys.readouterr().err


def test_ensure_key_makes_a_pair_once_and_again_if_one_half_is_missing(tmp_path: Path) -> None:
    from bootenv.signing import ensure_key

    key = tmp_path / "keys" / "k"
    ensure_key(key)
    pub = tmp_path / "keys" / "k.pub"
    first = pub.read_bytes()
    ensure_key(key)
    assert pub.read_bytes() == first  # both there: kept
    pub.unlink()  # a keygen cut short
    ensure_key(key)
    assert pub.exists() and pub.read_bytes() != first and key.exists()


def test_write_signature_leaves_a_current_one_alone_and_replaces_a_stale_one(tmp_path: Path) -> None:
    from bootenv.signing import SIGNATURE, ensure_key, write_signature

    key = tmp_path / "k"
    ensure_key(key)
    write_signature(tmp_path, b'{"a": 1}', key)
    sig = tmp_path / SIGNATURE
    mtime = sig.stat().st_mtime_ns
    write_signature(tmp_path, b'{"a": 1}', key)
    assert sig.stat().st_mtime_ns == mtime
    old = sig.read_bytes()
    write_signature(tmp_path, b'{"a": 2}', key)
    assert sig.read_bytes() != old and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("verb", ["verify", "sign"])
@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "big", "dir"])
def test_a_key_that_is_not_a_small_regular_file_is_refused_at_once(
    verb: str, what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/dev/zero was read for ever (MemoryError), a FIFO nobody writes to waited for ever."""
    from bootenv.cli import main

    image = make_image(tmp_path / "img")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * (1 << 20))
    (tmp_path / "dir").mkdir()
    key = what if what.startswith("/") else str(tmp_path / what)
    argv = ["verify", str(image), "--trust", key] if verb == "verify" else ["sign", str(image), "--key", key]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bootenv: error:"), err
    assert "is not a regular file" in err or "is larger than 8 KiB" in err, err
