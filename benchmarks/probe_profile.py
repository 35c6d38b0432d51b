"""Where a probe step's extra time goes on the CPU: torch profiler self time per aten op, a probe
step against a recorded step without probes, on the three benchmark workloads.

    python benchmarks/probe_profile.py   # -> results/probe-profile-cpu.md

Probe steps are what keeps gradwatch's defaults above 1.10x of plain training in total time on
the CPU (`overhead.py`); this table says which passes a cheaper probe step must cut.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_results
from workloads import WORKLOADS, Workload

import gradwatch as gw


def self_times(work: Workload, run_dir: Path, steps: int, **options: object) -> Counter[str]:
    """Self CPU time (ms per step) of each op over `steps` steps under gw.watch(**options)."""
    with gw.watch(work.model, work.optimizer, run_dir=run_dir, **options):
        for _ in range(3):
            work.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                work.step()
    return Counter({e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        f"# gradwatch probe-step profile (CPU, {torch.get_num_threads()} threads)",
        "",
        f"Command: `python benchmarks/probe_profile.py --steps {args.steps} --top {args.top}`. "
        "Self CPU time per step (torch profiler) of every step a probe step (probe_every=1, no "
        "histograms) minus every step recorded without probes (probe_every=None); the ops that "
        "account for the most of the difference. The profiler adds its own cost to each op.",
        "",
        "| workload | step without probes (ms) | probe step (ms) | op | extra ms per probe step |",
        "|---|---:|---:|---|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in WORKLOADS:
            work = WORKLOADS[name](torch.device("cpu"))
            plain = self_times(work, Path(tmp) / f"{name}-plain", args.steps, probe_every=None)
            probe = self_times(
                work, Path(tmp) / f"{name}-probe", args.steps, probe_every=1, histogram_every=None
            )
            extra = Counter({k: probe[k] - plain.get(k, 0.0) for k in probe})
            base, probed = sum(plain.values()), sum(probe.values())
            for i, (op, ms) in enumerate(extra.most_common(args.top)):
                head = f"| {name} | {base:.1f} | {probed:.1f}" if i == 0 else "| | |"
                lines.append(f"{head} | `{op}` | {ms:.2f} |")
            print(f"  {name} done", file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("probe-profile-cpu.md", table)


if __name__ == "__main__":
    main()
