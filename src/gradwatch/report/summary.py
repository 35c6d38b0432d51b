"""`gradwatch summary RUN`: the verdict, the findings and the worst layers, in the terminal."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from gradwatch.extras import optional
from gradwatch.guards.base import EVENT_KINDS
from gradwatch.report.data import ReportData

WORST = 5


def worst_layers(data: ReportData) -> list[tuple[str, float, str]]:
    """Tensors whose median gradient norm (second half of the run) is furthest from the typical
    tensor's, in orders of magnitude: (name, log10 distance, "zero" | "small" | "large").
    Tensors whose gradient is exactly zero come first."""
    grads = data.series("grad_norm")
    if grads is None or not np.isfinite(grads).any():
        return []
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(grads[len(grads) // 2 :], axis=0)
        logs = np.log10(medians)
    finite = np.isfinite(logs)
    distance = logs - (np.median(logs[finite]) if finite.any() else 0.0)
    zero = [(data.tensors[i]["name"], -math.inf, "zero") for i in np.flatnonzero(medians == 0)]
    order = [i for i in np.argsort(-np.abs(np.where(finite, distance, 0))) if finite[i]]
    ranked = [
        (data.tensors[i]["name"], float(distance[i]), "small" if distance[i] < 0 else "large")
        for i in order
        if distance[i] != 0
    ]
    return (zero + ranked)[:WORST]


def print_summary(run_dir: str | Path) -> None:
    """Print a run's verdict, findings and worst layers with rich."""
    optional("rich", "the summary")
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console()
    data = ReportData(run_dir)
    try:
        state, sentence = data.verdict
        color = {"healthy": "green", "problems": "red", "empty": "yellow"}[state]
        console.print(
            Panel(
                f"[bold {color}]{sentence}[/]\n{data.completeness}", title=f"gradwatch: {run_dir}"
            )
        )
        for f in data.findings:
            console.print(
                f"[bold]{f.kind}[/] at {f.layer or 'the whole model'!r}, "
                f"steps {f.step}-{f.last_step if f.last_step is not None else f.step}",
                highlight=False,
            )
            console.print(f"  {f.message}", markup=False, highlight=False)
            console.print(f"  [dim]what to do:[/] {f.remedy}", highlight=False)
        worst = worst_layers(data)
        if worst:
            table = Table(title="tensors whose gradient norm is furthest from the typical one")
            table.add_column("tensor")
            table.add_column("orders of magnitude", justify="right")
            for name, distance, side in worst:
                table.add_row(
                    name, "gradient is 0" if side == "zero" else f"{distance:+.1f} ({side})"
                )
            console.print(table)
        events = {k: sum(e.kind == k for e in data.events) for k in EVENT_KINDS}
        if any(events.values()):
            console.print("guard events: " + ", ".join(f"{k} {v}" for k, v in events.items()))
    finally:
        data.close()
