"""`make bench`: run the benchmarks, print a table, save JSON and a chart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import scenarios, timeline
from bench.harness import Result, Stats, chart, cpu_facts, fresh_ext4, save, table
from bootenv.cache import cache_root
from bootenv.gold import gold_tree
from bootenv.log import setup_logging
from bootenv.serve import ServeConfig, running

ALL = {
    "os-stream": scenarios.os_stream,
    "layout": scenarios.layout_speed,
    "parallel": scenarios.parallel_scaling,
    "split-vs-single": scenarios.split_vs_single,
    "memory": scenarios.memory,
    "capture": scenarios.capture_speed,
    "load": scenarios.load_test,
    "qemu-timeline": timeline.qemu_timeline,
}
RESULTS = Path(__file__).parent / "results"


def code_version(top: Path | None = None) -> dict[str, object]:
    """The commit of the checkout being measured (this one, or `top`), and whether its
    code differs from it: bootenv's and the harness's files, tracked or new, but not the
    results the runs write (None for both where git cannot tell)."""
    git = ["git", "-C", str(top or Path(__file__).resolve().parent.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "bootenv", "bench", ":(exclude)bench/results"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        why = exc.stderr.strip().splitlines()[-1] if isinstance(exc, subprocess.CalledProcessError) else exc
        print(f"warning: the results will not name the commit measured: {why}", file=sys.stderr)
        return {"commit": None, "modified": None}
    return {"commit": head.stdout.strip(), "modified": bool(status.stdout.strip())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--vm-runs",
        type=int,
        default=3,
        help="rounds of qemu-timeline's three netboots: split, OS + MySQL, single (each round ~4 min "
        "under TCG); its figures are medians over the rounds, as the others' are over --runs",
    )
    p.add_argument(
        "--vm-firmware",
        choices=("bios", "uefi"),
        default="bios",
        help="what qemu-timeline's VMs boot with: SeaBIOS (the default) or OVMF",
    )
    p.add_argument("--only", action="append", choices=sorted(ALL), help="run only these (repeatable)")
    p.add_argument(
        "--chart",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only draw chart.png from these result files (a later file's rows replace an earlier's)",
    )
    args = p.parse_args()
    if args.chart:
        rows: dict[str, Result] = {}
        for file in args.chart:
            for row in json.loads(file.read_text())["results"]:
                stats = {k: Stats(**v) for k, v in row.pop("measurements").items()}
                rows[row["name"]] = Result(**row, measurements=stats)
        print(f"chart: {chart(list(rows.values()), RESULTS / 'chart.png')}")
        return 0
    setup_logging()
    logging.getLogger("bootenv").setLevel(logging.WARNING)
    # Every run starts with the page cache dropped; without root nothing can drop it, and
    # the runs then start warm, which the results must say.
    cold = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    if not cold:
        print("warning: cannot drop the page cache (not root): every run starts warm", file=sys.stderr)
    code = code_version()  # before the run: what is measured is what was there at its start
    facts = cpu_facts()
    print(f"cpu: {facts['cpu_model']}, sha256 {facts['sha256_mb_s']} MB/s (sha_ni: {facts['sha_ni']})")
    gold = gold_tree()
    images = cache_root() / "bench" / "images"
    images.mkdir(parents=True, exist_ok=True)
    name = scenarios.gold_image(gold, images)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-", dir=cache_root()) as work,
        running(ServeConfig(images=images, state=Path(work) / "state", port=0)) as server,
    ):
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = scenarios.Env(Path(work), images, url, gold, name, args.runs, firmware=args.vm_firmware)
        for key, fn in ALL.items():
            if args.only and key not in args.only:
                continue
            start = time.monotonic()
            print(f"== {key}: {fn.__doc__.splitlines()[0] if fn.__doc__ else ''}", flush=True)
            runs = args.vm_runs if key == "qemu-timeline" else args.runs
            try:
                with fresh_ext4(Path(work) / "target.fs", Path(work) / "target") as target:
                    results += scenarios.rows(fn(dataclasses.replace(env, runs=runs, target=target)))
            except Exception as exc:  # one broken benchmark must not lose the others' numbers
                # Named as its row would be: a failed UEFI timeline must not replace the BIOS one.
                name = timeline.row_name(args.vm_firmware) if key == "qemu-timeline" else key
                failed = Result(name, "did not complete")
                failed.passed = False
                failed.notes.append(f"failed: {str(exc)[:300]}")
                results.append(failed)
            print(f"   ({time.monotonic() - start:.0f} s)", flush=True)
    print(table(results))
    meta = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        **facts,
        "runs": args.runs,
        "vm_runs": args.vm_runs,
        "vm_firmware": args.vm_firmware,
        "cold_cache": cold,
        "time": time.time(),
        **code,
    }
    path = save(results, RESULTS, meta)
    png = chart(results, RESULTS / "chart.png")
    print(f"results: {path}" + (f", chart: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
