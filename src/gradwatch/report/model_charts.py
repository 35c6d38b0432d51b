"""The charts for what only some models have (`charts.OPTIONAL_CHARTS`): per-example gradient
norms and the noise scale, the gradient through time of recurrent modules, and attention logits,
entropy and output log Z of transformers.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from gradwatch.report.axes import (
    log_scale,
    plain_text,
    windows,
)
from gradwatch.report.data import ReportData

MAX_RECURRENT = 4  # recurrent modules drawn in the gradient-through-time chart
MAX_ATTENTION = 12  # attention modules drawn in the attention chart


def per_example(data: ReportData) -> Figure | None:
    """Per-example gradient norms over the probe steps (median and largest of the totals,
    `per_example=True` runs), and the noise scale B_simple against the batch size (also from
    micro-batches or DDP ranks)."""
    median, largest = data.series("pe_total_p50"), data.series("pe_total_max")
    noise, batch = data.series("gns_simple"), data.series("gns_batch")
    examples = median is not None and largest is not None and np.isfinite(median).any()
    scale = noise is not None and batch is not None and np.isfinite(noise).any()
    if not examples and not scale:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if examples:
        rows = np.isfinite(median)
        steps = data.steps[rows]
        axes[0].plot(steps, median[rows], marker=".", label="median example")
        axes[0].plot(steps, largest[rows], marker=".", label="largest example")
        log_scale(axes[0], largest[rows])
        axes[0].legend(fontsize=8)
    axes[0].set_title("per-example gradient norm ‖∇ℓ_i‖ (probe steps)")
    axes[0].set_xlabel("step")
    if scale:
        known = np.isfinite(noise)
        axes[1].plot(data.steps[known], noise[known], marker=".", label="B_simple (EMA)")
        sized = np.isfinite(batch)
        axes[1].plot(data.steps[sized], batch[sized], ls="--", label="batch size")
        log_scale(axes[1], noise[known])
        axes[1].legend(fontsize=8)
    axes[1].set_title("gradient noise scale B_simple and the batch size")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    return fig


def through_time(data: ReportData) -> Figure | None:
    """‖∂L/∂x_t‖ over the time steps of each recurrent module's input, early/middle/late."""
    profiles = {name: p for name, p in data.through_time.items() if np.isfinite(p).any()}
    if not profiles:
        return None
    shown = list(profiles.items())[:MAX_RECURRENT]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    types = dict(zip(data.modules, data.module_types, strict=True))
    for ax, (name, profile) in zip(axes[0], shown, strict=True):
        for label, line in windows(data, profile):
            ax.plot(line, marker=".", label=label)
        log_scale(ax, profile)
        ax.set_title(f"{plain_text(name)} ({types.get(name, '?')}): ‖∂L/∂x_t‖ (probe steps)")
        ax.set_xlabel("time step of the input sequence (first left, last right)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention(data: ReportData) -> Figure | None:
    """Per attention module, the max attention logit and the lowest head entropy over the probe
    steps, with the output logits' mean log Z when a cross-entropy ran."""
    largest, entropy = data.series("attn_max_logit"), data.series("attn_entropy")
    if largest is None or entropy is None or not np.isfinite(largest).any():
        return None
    names = data.run.attention_modules
    lse = data.series("logit_lse")
    panels = 3 if lse is not None and np.isfinite(lse).any() else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4))
    for c, name in enumerate(names[:MAX_ATTENTION]):
        rows = np.isfinite(largest[:, c])
        axes[0].plot(data.steps[rows], largest[rows, c], marker=".", label=plain_text(name))
        axes[1].plot(data.steps[rows], entropy[rows, c], marker=".", label=plain_text(name))
    log_scale(axes[0], largest)
    axes[0].set_title("max attention logit |q·k|/√d (probe steps)")
    axes[1].set_title("lowest head entropy, mean over queries (nats)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    if panels == 3:
        rows = np.isfinite(lse)
        axes[2].plot(data.steps[rows], lse[rows], marker=".", color="black")
        axes[2].axhline(0, color="gray", lw=0.5)
        axes[2].set_title("output logits: mean log Z (logsumexp)")
        axes[2].set_xlabel("step")
    fig.tight_layout()
    return fig
