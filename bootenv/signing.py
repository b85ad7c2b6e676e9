"""Ed25519 signatures over the manifest. The manifest pins every blob's sha256, so one
signature covers the whole composite image.

Files: `KEY` (PKCS#8 PEM private key, mode 0600), `KEY.pub` (one line:
`ed25519 <base64 raw key>`), and the image's `manifest.json.sig`:
{"algorithm": "ed25519", "public_key": "<base64>", "signature": "<base64>"}.
A key is trusted by its public key file or pinned by its fingerprint
(`sha256:<hex of sha256(raw public key)>`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bootenv.errors import UserError, VerificationError
from bootenv.smallfile import read_small
from bootenv.writeback import fsync_dir, new_file, write_all

log = logging.getLogger(__name__)

SIGNATURE = "manifest.json.sig"
ALGORITHM = "ed25519"
MAX_SIGNATURE = 4096  # a real one is about 200 bytes
MAX_KEY_FILE = 8192  # a key file: keygen's private key is 119 bytes, its .pub 53


@dataclass(frozen=True)
class Trust:
    """What a provisioner accepts: raw public keys and/or pinned fingerprints."""

    keys: tuple[bytes, ...] = ()
    fingerprints: tuple[str, ...] = ()
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.keys or self.fingerprints)


def fingerprint(public_key: bytes) -> str:
    return "sha256:" + hashlib.sha256(public_key).hexdigest()


def parse_fingerprint(text: str) -> str:
    fp = text.strip().lower()
    hexpart = fp.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise UserError(f"bad key fingerprint {text!r}", hint="use sha256:<64 hex digits>")
    return "sha256:" + hexpart


def keygen(path: Path) -> str:
    """Write a new private key at `path` and its public key at `path.pub`, making the
    directory (0700) if it is missing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise UserError(f"{p} already exists", hint="refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        # The key's directory is made private if it is new (/etc/bootenv on a fresh machine).
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from exc
    # Both written whole under temp names, then linked into place (a link never replaces
    # a key made meanwhile), the private key last: a full disk or a kill leaves neither,
    # or both, never a key without its .pub nor an empty key.
    pub_tmp = _tmp_name(pub_path)
    key_tmp = _tmp_name(path)
    placed: list[Path] = []
    try:
        _write_new(pub_tmp, f"{ALGORITHM} {base64.b64encode(raw).decode()}\n".encode(), 0o644, pub_path)
        _write_new(key_tmp, pem, 0o600, path)
        for tmp, final in ((pub_tmp, pub_path), (key_tmp, path)):
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise UserError(f"{final} already exists", hint="refusing to overwrite a key") from None
            except OSError as exc:
                raise UserError(f"cannot write {final}: {exc.strerror}") from exc
            placed.append(final)
        fsync_dir(path.parent)
    except BaseException:
        for made in placed:
            made.unlink(missing_ok=True)
        raise
    finally:
        pub_tmp.unlink(missing_ok=True)
        key_tmp.unlink(missing_ok=True)
    return fingerprint(raw)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _write_new(tmp: Path, data: bytes, mode: int, final: Path) -> None:
    """Make `tmp` anew (writeback.new_file: never through an existing file or a symlink)
    with `mode`, write `data` and fsync it; on any failure it is removed, and an OSError
    is one line naming `final`."""
    try:
        with new_file(tmp, mode) as fd:
            write_all(fd, data)
    except OSError as exc:
        raise UserError(f"cannot write {final}: {exc.strerror}") from exc


def read_public_key(path: Path) -> bytes:
    data = read_small(path, MAX_KEY_FILE, "public key")
    try:
        algo, _, b64 = data.decode().strip().partition(" ")
        raw = base64.b64decode(b64, validate=True)
    except ValueError:  # not text, or not base64
        algo, raw = "", b""
    if algo != ALGORITHM or len(raw) != 32:
        raise UserError(f"{path} is not a bootenv ed25519 public key", hint="`bootenv keygen` writes KEY.pub")
    return raw


def sign(manifest: bytes, key_path: Path) -> bytes:
    """The signature file's content for these exact manifest bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = read_small(key_path, MAX_KEY_FILE, "private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:  # cryptography's text is OpenSSL's internals
        raise UserError(
            f"{key_path} is not an unencrypted PEM private key",
            hint="sign with the key `bootenv keygen` wrote, not its .pub",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{key_path} is not an ed25519 private key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def ensure_key(path: Path) -> None:
    """A key pair at `path` and `path.pub`, made unless both are there (a keygen cut
    short leaves one: it is made again). The caller holds whatever lock guards `path`."""
    pub = path.with_name(path.name + ".pub")
    if path.exists() and pub.exists():
        return
    path.unlink(missing_ok=True)
    pub.unlink(missing_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keygen(path)


def write_signature(image: Path, manifest: bytes, key_path: Path) -> None:
    """Sign `manifest` into IMAGE/manifest.json.sig, written whole (a temp name, then a
    rename): a reader never sees half a signature. Ed25519 signs deterministically, so a
    signature already there for these bytes is left as it is."""
    sig = sign(manifest, key_path)
    path = image / SIGNATURE
    with contextlib.suppress(OSError):
        if path.read_bytes() == sig:
            return
    tmp = image / f".{SIGNATURE}.tmp"
    try:
        _write_new(tmp, sig, 0o644, path)  # a killed run's tmp, or a planted link, goes first
        try:
            tmp.replace(path)
            fsync_dir(image)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def verify(manifest: bytes, signature: bytes | None, trust: Trust) -> str | None:
    """Check the manifest's signature against the trusted keys.

    Returns the signer's fingerprint, or None when verification is off (--insecure).
    Raises VerificationError for a bad or untrusted signature, UserError when unsigned.
    """
    if signature is None:
        if trust.insecure:
            _loud_warning("the image is NOT signed")
            return None
        raise VerificationError(
            f"the image is not signed (no {SIGNATURE})",
            hint="sign it with `bootenv sign`, or pass --insecure / bootenv.insecure=1",
        )
    try:
        if len(signature) > MAX_SIGNATURE:
            raise ValueError("too large")
        doc = json.loads(signature)
        ok = isinstance(doc, dict) and set(doc) == {"algorithm", "public_key", "signature"}
        ok = ok and doc["algorithm"] == ALGORITHM
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        ok = False
    if not ok:
        raise VerificationError(f"{SIGNATURE} is malformed")
    raw = _b64(doc["public_key"], "signature key")
    sig = _b64(doc["signature"], "signature")
    fp = fingerprint(raw)
    if not trust.configured:
        if trust.insecure:
            _loud_warning(f"no trusted key configured; signer {fp} is not checked")
            return None
        raise UserError("no trusted key configured", hint="pass --trust KEY.pub or --fingerprint FP")
    if raw not in trust.keys and fp not in trust.fingerprints:
        raise VerificationError(f"the image is signed by an untrusted key {fp}")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, manifest)
    except (InvalidSignature, ValueError) as exc:
        raise VerificationError("the manifest signature does not verify: the image was altered") from exc
    log.info("Manifest signature verified (key %s)", fp)
    return fp


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(f"{what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"{what} is not valid base64") from exc


def _loud_warning(what: str) -> None:
    bar = "!" * 72
    log.warning("%s", bar)
    log.warning("!! INSECURE: %s; image verification is OFF", what)
    log.warning("%s", bar)
