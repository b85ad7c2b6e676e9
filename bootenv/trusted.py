"""Open a composite image and check its signature before anything else is read."""

from __future__ import annotations

import hashlib
import logging

from bootenv.errors import VerificationError
from bootenv.httpreader import MissingError
from bootenv.log import Progress
from bootenv.manifest import Blob, Manifest, parse_manifest
from bootenv.signing import MAX_SIGNATURE, SIGNATURE, Trust, verify
from bootenv.source import Source, TooLargeError, open_source, read_manifest

log = logging.getLogger(__name__)


def open_trusted(location: str, trust: Trust) -> tuple[Source, Manifest]:
    """The image's source and its manifest, once the signature checks out."""
    source, manifest, _ = open_signed(location, trust)
    return source, manifest


def open_signed(location: str, trust: Trust) -> tuple[Source, Manifest, str | None]:
    """open_trusted, and the fingerprint of the key that signed the manifest (None when
    verification is off)."""
    source = open_source(location)
    raw = read_manifest(source)
    try:
        signature: bytes | None = source.read_bytes(SIGNATURE, MAX_SIGNATURE)
    except MissingError:  # not signed; a signature that cannot be read is an error
        signature = None
    except TooLargeError as exc:
        raise VerificationError(f"{SIGNATURE} is malformed ({exc})") from exc
    signer = verify(raw, signature, trust)
    return source, parse_manifest(raw), signer


def verify_blob(source: Source, blob: Blob) -> None:
    """Stream one blob and check its size and sha256 (constant memory)."""
    digest = hashlib.sha256()
    size = 0
    progress = Progress(f"verifying {blob.file[:12]}", blob.size)
    with source.open(blob.file, blob.size) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            progress.update(len(chunk))
    progress.close()
    if size != blob.size or digest.hexdigest() != blob.sha256:
        raise VerificationError(f"{source.describe(blob.file)} does not match the manifest (size or sha256)")
