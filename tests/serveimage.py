"""A small fake composite image (random blobs named by their sha256) for server tests."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from bootenv.manifest import FORMAT, VERSION


def _blob(image: Path, data: bytes, suffix: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    name = f"{digest}.{suffix}"
    (image / name).write_bytes(data)
    return {"file": name, "sha256": digest, "size": len(data), "raw_size": len(data) * 3}


def make_image(
    images: Path, name: str = "lamp", components: dict[str, int] | None = None, *, seed: int = 1
) -> Path:
    """images/NAME with manifest.json, an OS blob and one blob per component (name: size)."""
    rng = random.Random(seed)
    comps = components if components is not None else {"apache": 70_000, "mysql": 90_000, "php": 50_000}
    image = images / name
    image.mkdir(parents=True)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "source": {
            "hostname": "gold",
            "os_release": "Debian GNU/Linux 12 (bookworm)",
            "architecture": "amd64",
            "kernel": "6.1.0-18-amd64",
            "captured_at": "2024-01-01T00:00:00Z",
        },
        "rootfs": {"type": "ext4", "image_size": 1 << 30, "min_size": 1 << 29, "block_size": 4096},
        "os": {
            "data": _blob(image, rng.randbytes(200_000), "img.zst"),
            "blockmap": _blob(image, b'{"ranges": []}\n', "json"),
            "packages": ["base-files"],
            "files": 10,
        },
        "components": [
            {
                "name": cname,
                "data": _blob(image, rng.randbytes(size), "tar.zst"),
                "packages": [cname],
                "depends": ["apache"] if cname == "php" and "apache" in comps else [],
                "files": 3,
                "units": [],
            }
            for cname, size in comps.items()
        ],
    }
    (image / "manifest.json").write_text(json.dumps(doc, indent=2))
    return image
