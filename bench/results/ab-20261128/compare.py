"""The interleaved A/B of 2026-11-28: the twentieth session's last commit (27c8396, A)
against the twenty-first's (4295ca1, B), `--only layout --only capture --runs 1`, run
A, B, A, B, ... five times each on one quiet machine. Prints each side's median and
runs, and the paired bootenv/baseline ratio of each run (lower is better for bootenv).

    python3 bench/results/ab-20261128/compare.py
"""

import json
import statistics
from pathlib import Path

SIDES = {"27c8396": "A", "4295ca1": "B"}
PAIRS = [
    ("layout", "bootenv layout (s)", "zstd -dc | tar -x (s)"),
    ("layout (synthetic)", "bootenv layout (s)", "zstd -dc | tar -x (s)"),
    ("capture", "bootenv capture (s)", "tar|zstd -T0 (s)"),
    ("capture (synthetic)", "bootenv capture (s)", "tar|zstd -T0 (s)"),
]


def main() -> None:
    runs: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted(Path(__file__).parent.glob("bench-*.json")):
        doc = json.loads(path.read_text())
        side = SIDES[doc["meta"]["commit"][:7]]
        for row in doc["results"]:
            for key, stats in row["measurements"].items():
                runs.setdefault((row["name"], key, side), []).append(stats["median"])
    for name, ours, theirs in PAIRS:
        for key in (ours, theirs):
            a, b = runs[(name, key, "A")], runs[(name, key, "B")]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{name:20s} {key:22s} A {ma:6.3f}  B {mb:6.3f}  B/A {mb / ma:.3f}")
        for side in "AB":
            ratios = [
                o / t for o, t in zip(runs[(name, ours, side)], runs[(name, theirs, side)], strict=True)
            ]
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            print(
                f"{'':20s} paired bootenv/baseline {side}: median {statistics.median(ratios):.3f} ({shown})"
            )


if __name__ == "__main__":
    main()
