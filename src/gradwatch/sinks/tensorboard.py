"""TensorBoard: a live sink for `watch(sinks=...)` and `export_tensorboard` for a stored run.

Tags: `grad/<stat>/<tensor>` for per-tensor statistics, `module/<stat>/<module>` for per-module
ones, `scalars/<name>` for per-step scalars, `attention/<stat>/<module>` for the attention
statistics of transformers, the probe steps' histograms as TensorBoard histograms
under `grad_hist/<tensor>` (log10|g|) and `act_hist/<module>` (output values), and the findings
as text under `findings`. Only recorded (finite) values are written. Histograms go through the
raw-histogram API: only the counts leave the store; the open end bins get finite edges
(`finite_edges`), and min, max, sum and sum of squares are read from the bins (their edges and
centres), as the counts are all that is stored. Needs the `tensorboard` package
(`gradwatch[tensorboard]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.extras import optional
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import ProbeArray, StatsBlock
from gradwatch.stats.histograms import HISTOGRAM_EDGES, finite_edges


def _summary_writer(log_dir: str | Path) -> Any:
    optional("tensorboard", "TensorBoard output")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class TensorBoard:
    """Writes each flushed block and each finding to TensorBoard event files in `log_dir`."""

    def __init__(self, log_dir: str | Path) -> None:
        self._writer = _summary_writer(log_dir)

    def write_block(self, block: StatsBlock, tensors: list[str], modules: list[str]) -> None:
        self._scalars(block.steps, block.tensor_data, block.tensor_stats, tensors, "grad")
        self._scalars(block.steps, block.module_data, block.module_stats, modules, "module")
        for c, name in enumerate(block.scalar_names):
            for step, value in zip(block.steps, block.scalar_data[:, c], strict=True):
                if np.isfinite(value):
                    self._writer.add_scalar(f"scalars/{name}", float(value), int(step))
        for name, array in block.arrays.items():
            if name in HISTOGRAM_EDGES:
                self._histograms(name, array)
            elif name == ATTENTION:
                self._scalars(array.steps, array.data, ATTENTION_STATS, array.columns, "attention")

    def write_findings(self, findings: list[Finding]) -> None:
        for f in findings:
            self._writer.add_text(
                "findings",
                f"**{f.kind}** at `{f.layer}`: {f.message}\n\nWhat to do: {f.remedy}",
                f.step,
            )

    def close(self) -> None:
        self._writer.close()

    def _histograms(self, name: str, array: ProbeArray) -> None:
        edges = finite_edges(name)
        centres = (edges[:-1] + edges[1:]) / 2
        for r, step in enumerate(array.steps):
            for c, column in enumerate(array.columns):
                counts = array.data[r, c]
                if not np.isfinite(counts).all() or counts.sum() == 0:
                    continue
                filled = np.flatnonzero(counts)
                self._writer.add_histogram_raw(
                    f"{name}/{column}",
                    min=float(edges[filled[0]]),
                    max=float(edges[filled[-1] + 1]),
                    num=int(counts.sum()),
                    sum=float(counts @ centres),
                    sum_squares=float(counts @ centres**2),
                    bucket_limits=edges[1:].tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=int(step),
                )

    def _scalars(self, steps, data, stats, names, prefix) -> None:
        for s, stat in enumerate(stats):
            for c, name in enumerate(names):
                values = data[:, c, s]
                for step, value in zip(steps, values, strict=True):
                    if np.isfinite(value):
                        self._writer.add_scalar(f"{prefix}/{stat}/{name}", float(value), int(step))


def export_tensorboard(run_dir: str | Path, log_dir: str | Path) -> Path:
    """Write a stored run (live or finished) as TensorBoard event files in `log_dir`."""
    from gradwatch.report.data import processes_line
    from gradwatch.run_reader import Run

    run = Run(run_dir)
    sink = TensorBoard(log_dir)
    try:
        sink._writer.add_text("run", f"gradwatch run {run_dir}: {processes_line(run.meta)}", 0)
        tensors, modules = run.tensors, run.modules
        for block in run.blocks():
            sink.write_block(block, tensors, modules)
        sink.write_findings(run.findings)
    finally:
        sink.close()
        run.close()
    return Path(log_dir)
