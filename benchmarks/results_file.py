"""Results files: each is stamped with the commit and the machine that produced it, so a number
quoted from one can be traced to the code it measured."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> str:
    """'Commit ..., date; machine: ...' for the current checkout and this machine."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    # The measured code: the package, the benchmarks (not their results), the build settings.
    changed = _git(
        "status", "--porcelain", "--", "src", "benchmarks", ":!benchmarks/results", "pyproject.toml"
    )
    if changed:
        commit += " with uncommitted changes to the measured code"
    machine = f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    today = datetime.date.today().isoformat()
    return (
        f"Commit {commit}, {today}; machine: {machine}; Python {platform.python_version()}, "
        f"torch {torch.__version__}."
    )


# Taken when a benchmark starts (it imports this module first): the code it loaded and measures.
STARTED_AT = provenance()


def write_results(name: str, table: str) -> Path:
    """Write `table` (its first line the title) to results/`name`, with the stamp taken when the
    benchmark started under the title; print where."""
    title, _, rest = table.partition("\n")
    out = RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{title}\n\n{STARTED_AT}\n{rest}")
    print(f"written to {out}", flush=True)
    return out
