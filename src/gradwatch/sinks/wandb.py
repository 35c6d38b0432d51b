"""Weights & Biases: a live sink for `watch(sinks=[gw.sinks.WandB()])`.

Logs the metrics of `sinks/live.py` (its histograms as `wandb.Histogram`) against their own
x-axis `gradwatch/step` (the optimizer step), so they do not clash with the run's own step
counter, and each finding once as a W&B alert (also
in offline mode) and in the run summary under `gradwatch/findings`. Writes from gradwatch's writer
thread, never in the training step. Needs `wandb` (`pip install 'gradwatch[wandb]'`).
"""

from __future__ import annotations

from typing import Any

from gradwatch.detect.findings import Finding
from gradwatch.extras import optional
from gradwatch.sinks.live import DEFAULT_LAYERS, PREFIX, STEP, LiveMetrics, finding_title
from gradwatch.stats.buffer import StatsBlock


class WandB:
    """Sends gradwatch's live metrics and findings to a W&B run: `run`, or the active `wandb.run`.

    `layers` bounds the per-layer metrics (see `sinks/live.py`). The run stays open at `close()`:
    it is the caller's to finish.
    """

    def __init__(self, run: Any = None, layers: int = DEFAULT_LAYERS) -> None:
        wandb = optional("wandb", "the W&B sink")
        self._run = run if run is not None else wandb.run
        if self._run is None:
            raise ValueError(
                "the W&B sink found no active run: call wandb.init() before gw.watch(), or pass "
                "gw.sinks.WandB(run=...)"
            )
        self._metrics = LiveMetrics(layers)
        self._histogram = wandb.Histogram
        self._alert_level = wandb.AlertLevel
        self._findings: list[str] = []
        self._run.define_metric(STEP)
        self._run.define_metric(f"{PREFIX}/*", step_metric=STEP)

    def write_block(self, block: StatsBlock, tensors: list[str], modules: list[str]) -> None:
        histograms = self._metrics.histograms(block, tensors, modules)
        for step, metrics in self._metrics.rows(block, tensors, modules):
            for key, (counts, edges) in histograms.get(step, {}).items():
                metrics[key] = self._histogram(np_histogram=(counts, edges))
            self._run.log({STEP: step, **metrics})

    def write_findings(self, findings: list[Finding]) -> None:
        for finding in self._metrics.new_findings(findings):
            error = finding.severity == "error"
            self._run.alert(
                title=finding_title(finding),
                text=str(finding),
                level=self._alert_level.ERROR if error else self._alert_level.WARN,
            )
            self._findings.append(str(finding))
            self._run.summary[f"{PREFIX}/findings"] = list(self._findings)

    def close(self) -> None:
        return None
