"""MLflow: a live sink for `watch(sinks=[gw.sinks.MLflow()])`.

Logs the metrics of `sinks/live.py` with the optimizer step as MLflow's step, through an
`MlflowClient` bound to one run id (safe from gradwatch's writer thread, which is where it runs;
never in the training step), and each finding once as a tag `gradwatch.finding.<kind>.<layer>`
plus the text file `gradwatch/findings.txt` among the run's artifacts. Needs MLflow's tracking
client (`pip install 'gradwatch[mlflow]'`).
"""

from __future__ import annotations

import time

from gradwatch.detect.findings import Finding
from gradwatch.extras import optional
from gradwatch.sinks.live import DEFAULT_LAYERS, LiveMetrics, metric_key
from gradwatch.stats.buffer import StatsBlock

_BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
_TAG_LENGTH = 5000  # the smallest tag value limit across MLflow versions


class MLflow:
    """Sends gradwatch's live metrics and findings to an MLflow run: `run_id`, or the active run
    (`mlflow.start_run()`). `layers` bounds the per-layer metrics (see `sinks/live.py`)."""

    def __init__(self, run_id: str | None = None, layers: int = DEFAULT_LAYERS) -> None:
        mlflow = optional("mlflow", "the MLflow sink")
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError(
                    "the MLflow sink found no active run: call mlflow.start_run() before "
                    "gw.watch(), or pass gw.sinks.MLflow(run_id=...)"
                )
            run_id = active.info.run_id
        self.run_id = run_id
        self._client = mlflow.MlflowClient()
        self._metric = optional("mlflow.entities", "the MLflow sink").Metric
        self._metrics = LiveMetrics(layers)
        self._findings: list[str] = []

    def write_block(self, block: StatsBlock, tensors: list[str], modules: list[str]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self._metric(metric_key(name), value, now, step)
            for step, values in self._metrics.rows(block, tensors, modules)
            for name, value in values.items()
        ]
        for start in range(0, len(metrics), _BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH])

    def write_findings(self, findings: list[Finding]) -> None:
        new = self._metrics.new_findings(findings)
        for finding in new:
            key = metric_key(f"gradwatch.finding.{finding.kind}.{finding.layer or 'model'}")
            self._client.set_tag(self.run_id, key, str(finding)[:_TAG_LENGTH])
            self._findings.append(str(finding))
        if new:
            text = "\n\n".join(self._findings) + "\n"
            self._client.log_text(self.run_id, text, "gradwatch/findings.txt")

    def close(self) -> None:
        return None
