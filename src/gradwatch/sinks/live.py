"""What a live dashboard sink (W&B, MLflow) receives from each committed block: a bounded set of
metrics, and each finding once.

Per recorded step `gradwatch/global_grad_norm`; on probe steps `gradwatch/grad_norm/<tensor>` and
`gradwatch/signal_norm/<module>` for at most `layers` tensors and `layers` modules, spread evenly
over the model's depth (first and last included). So a sink holds at most 1 + 2·layers metric
series (33 with the default 16), whatever the size of the model. Sinks that show histograms (W&B)
also get, on probe steps, `gradwatch/grad_hist/<tensor>` and `gradwatch/act_hist/<module>` for
the same tensors and modules (see `stats/histograms.py` for the bins). Transformers add, on probe
steps, `gradwatch/attn_max_logit/<module>` and `gradwatch/attn_entropy/<module>` for at most
`layers` attention modules and `gradwatch/logit_lse` (`stats/attention.py`): the early signs of
their instabilities.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import numpy as np

from gradwatch.arguments import count
from gradwatch.detect.findings import Finding
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import StatsBlock
from gradwatch.stats.histograms import finite_edges

PREFIX = "gradwatch"
STEP = f"{PREFIX}/step"
DEFAULT_LAYERS = 16


def spread(count: int, limit: int) -> list[int]:
    """At most `limit` indices out of range(count), evenly spaced, first and last included."""
    if count <= limit:
        return list(range(count))
    if limit == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


class LiveMetrics:
    """Turns blocks into per-step metric dicts and remembers which findings were sent."""

    def __init__(self, layers: int = DEFAULT_LAYERS) -> None:
        self.layers = count("layers", layers)
        self._sent: set[tuple[str, str]] = set()

    def rows(
        self, block: StatsBlock, tensors: list[str], modules: list[str]
    ) -> Iterator[tuple[int, dict[str, float]]]:
        """(step, {metric name: value}) for each step of the block, finite values only."""
        chosen_tensors = spread(len(tensors), self.layers)
        chosen_modules = spread(len(modules), self.layers)
        grads = block.tensor_series("grad_norm")
        signals = block.module_series("signal_norm")
        global_norms = block.scalar("global_grad_norm")
        attention = self._attention(block)
        lse = block.scalar("logit_lse")
        for r, step in enumerate(block.steps):
            metrics = {f"{PREFIX}/global_grad_norm": float(global_norms[r])}
            metrics.update(attention.get(int(step), {}))
            metrics[f"{PREFIX}/logit_lse"] = float(lse[r])
            if np.isfinite(signals[r]).any():  # a probe step
                for t in chosen_tensors:
                    metrics[f"{PREFIX}/grad_norm/{tensors[t]}"] = float(grads[r, t])
                for m in chosen_modules:
                    metrics[f"{PREFIX}/signal_norm/{modules[m]}"] = float(signals[r, m])
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            if finite:
                yield int(step), finite

    def _attention(self, block: StatsBlock) -> dict[int, dict[str, float]]:
        """Per probe step, the attention statistics of at most `layers` attention modules."""
        array = block.arrays.get(ATTENTION)
        if array is None or not array.data.size:
            return {}
        chosen = spread(len(array.columns), self.layers)
        return {
            int(step): {
                f"{PREFIX}/{stat}/{array.columns[c]}": float(array.data[r, c, s])
                for s, stat in enumerate(ATTENTION_STATS)
                for c in chosen
            }
            for r, step in enumerate(array.steps)
        }

    def histograms(
        self, block: StatsBlock, tensors: list[str], modules: list[str]
    ) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per probe step of the block, `{PREFIX}/grad_hist/<tensor>` and `.../act_hist/<module>`
        as (counts, finite edges) for the same chosen tensors and modules as `rows`."""
        chosen = {
            "grad_hist": {tensors[t] for t in spread(len(tensors), self.layers)},
            "act_hist": {modules[m] for m in spread(len(modules), self.layers)},
        }
        out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for name, names in chosen.items():
            array = block.arrays.get(name)
            if array is None:
                continue
            edges = finite_edges(name)
            for r, step in enumerate(array.steps):
                for c, column in enumerate(array.columns):
                    counts = array.data[r, c]
                    if column in names and np.isfinite(counts).all() and counts.sum() > 0:
                        key = f"{PREFIX}/{name}/{column}"
                        out.setdefault(int(step), {})[key] = (counts, edges)
        return out

    def new_findings(self, findings: list[Finding]) -> list[Finding]:
        """The findings whose (kind, layer) was not sent before."""
        new = [f for f in findings if (f.kind, f.layer) not in self._sent]
        self._sent.update((f.kind, f.layer) for f in new)
        return new


def metric_key(name: str) -> str:
    """A metric name the trackers accept: letters, digits, `_ - . / space`; others become `_`."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def finding_title(finding: Finding) -> str:
    return f"gradwatch: {finding.kind} at {finding.layer or 'the whole model'}"
