"""Size and build time of the HTML report for a large run: 200 tensors x 100k steps (synthetic
statistics written through the real run store), on this machine.

    python benchmarks/report_size.py   # -> results/report-cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_results
from synthetic_run import synthetic_run

import gradwatch as gw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_dir = synthetic_run(Path(tmp) / "run", tensors=args.tensors, steps=args.steps)
        made = time.perf_counter() - start
        store = (run_dir / "run.sqlite").stat().st_size
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            page = gw.report(run_dir, Path(tmp) / "report.html")
            times.append(time.perf_counter() - start)
        size = page.stat().st_size
    times.sort()
    table = (
        f"# gradwatch report of a large run (CPU, {os.cpu_count()} cores)\n\n"
        f"Command: `python benchmarks/report_size.py --tensors {args.tensors} --steps "
        f"{args.steps}`.\n\n"
        "| run | store size | report build (median of {n}) | report size |\n"
        "|---|---:|---:|---:|\n"
        f"| {args.tensors} tensors x {args.steps} steps (written in {made:.0f} s) | "
        f"{store / 1e6:.0f} MB | {times[len(times) // 2]:.1f} s | {size / 1e6:.2f} MB |\n"
    ).replace("{n}", str(args.repeats))
    print(table)
    write_results("report-cpu.md", table)


if __name__ == "__main__":
    main()
