"""How the verbs render their answers for printing: text in aligned columns, the
sub-images' summary (`capture`, `inspect`), indented JSON (`--json`).
"""

from __future__ import annotations

import json

from bootenv.log import human_bytes


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(manifest: object) -> list[list[str]]:
    from bootenv.manifest import Manifest

    assert isinstance(manifest, Manifest)
    rows = [["sub-image", "packages", "files", "raw", "compressed", "ratio", "depends"]]

    def row(name: str, pkgs: int, files: int, raw: int, size: int, deps: str) -> None:
        ratio = f"{raw / size:.1f}x" if size else "-"
        rows.append([name, str(pkgs), str(files), human_bytes(raw), human_bytes(size), ratio, deps])

    m = manifest
    row("os", len(m.os.packages), m.os.files, m.os.data.raw_size, m.os.data.size, "-")
    for c in m.components:
        row(c.name, len(c.packages), c.files, c.data.raw_size, c.data.size, ",".join(c.depends) or "-")
    if m.single:
        row(
            "(single)",
            len(m.single.packages),
            m.single.files,
            m.single.data.raw_size,
            m.single.data.size,
            "-",
        )
    return rows


def json_text(data: object) -> str:
    return json.dumps(data, indent=2)
