"""Compare an interleaved A/B: result files of two commits' runs, taken in turn.

    python3 -m bench.ab bench/results/ab-20261128

The directory holds the result files (`meta.commit` names each one's side) of runs made
one after the other, A, B, A, B, ... on a quiet machine, each from a checkout of its
commit (`PYTHONPATH=CHECKOUT python -m bench.run --only layout --only capture --runs 1`).
A is the commit of the earliest file. For each of layout and capture (LAMP and
synthetic) it prints each side's median time and their ratio, and each run's bootenv
time over its baseline's in the same run (lower is better for bootenv), which cancels
the machine's drift from one run to the next.
"""

import json
import statistics
import sys
from pathlib import Path

PAIRS = [
    ("layout", "bootenv layout (s)", "zstd -dc | tar -x (s)"),
    ("layout (synthetic)", "bootenv layout (s)", "zstd -dc | tar -x (s)"),
    ("capture", "bootenv capture (s)", "tar|zstd -T0 (s)"),
    ("capture (synthetic)", "bootenv capture (s)", "tar|zstd -T0 (s)"),
]


def main(directory: Path) -> None:
    docs = [json.loads(p.read_text()) for p in directory.glob("bench-*.json")]
    docs.sort(key=lambda d: d["meta"]["time"])
    sides: dict[str, str] = {}
    for doc in docs:
        commit = doc["meta"]["commit"]
        if commit not in sides:
            if len(sides) == 2:
                sys.exit(f"{directory} holds runs of more than two commits")
            sides[commit] = "AB"[len(sides)]
    for commit, side in sides.items():
        print(f"{side}: {commit[:12]}")
    runs: dict[tuple[str, str, str], list[float]] = {}
    for doc in docs:
        side = sides[doc["meta"]["commit"]]
        for row in doc["results"]:
            for key, stats in row["measurements"].items():
                runs.setdefault((row["name"], key, side), []).append(stats["median"])
    for name, ours, theirs in PAIRS:
        if (name, ours, "B") not in runs:
            continue
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
    main(Path(sys.argv[1]))
