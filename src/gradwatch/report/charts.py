"""Matplotlib figures of a run: gradient flow, layer x step heatmap, global norm with guard events,
logged scalars, update-to-weight ratios, activation health, the distribution of log10|g| over
steps and the share of zero or tiny gradient entries; for models that have them, the charts of
`model_charts.py` (per-example norms, the gradient through time, attention).

Every chart is `fn(data) -> Figure | str | None`: a figure; a sentence when the run holds the data
but there is nothing to draw (no dead or saturated unit); None when the run did not record it.
A series recorded on some steps only (probe steps, or logged every so often) is drawn as points,
so the gaps between them do not break its line into nothing. Long runs and
many layers are downsampled: at most MAX_POINTS step bins per line, MAX_COLUMNS x MAX_ROWS cells in
the heatmap, so a chart's size does not grow with the run.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from gradwatch.report.axes import (
    MAX_POINTS,
    bins,
    depth_axis,
    draw_series,
    log10,
    log_scale,
    plain_text,
    windows,
)
from gradwatch.report.data import ReportData
from gradwatch.report.model_charts import attention, per_example, through_time
from gradwatch.stats.histograms import finite_edges

MAX_COLUMNS = 400
MAX_ROWS = 200
STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3}


def gradient_flow(data: ReportData) -> Figure | None:
    """Per-layer weight-gradient norm and backpropagated signal by depth, early/middle/late."""
    grads = data.series("grad_norm")
    signal = data.series("signal_norm")
    if grads is None or len(data.steps) == 0:
        return None
    has_signal = signal is not None and np.isfinite(signal).any()
    fig, axes = plt.subplots(
        1, 2 if has_signal else 1, figsize=(12 if has_signal else 7, 4.2), squeeze=False
    )
    columns = data.weight_columns
    names = [data.tensors[c]["name"] for c in columns]
    for label, profile in windows(data, grads[:, columns]):
        axes[0, 0].plot(profile, marker=".", label=label)
    log_scale(axes[0, 0], grads[:, columns])
    axes[0, 0].set_title("weight gradient norm ‖∂L/∂W‖ by layer")
    depth_axis(axes[0, 0], names, "parameter tensor")
    axes[0, 0].legend(fontsize=8)
    if has_signal:
        for label, profile in windows(data, signal):
            axes[0, 1].plot(profile, marker=".", label=label)
        log_scale(axes[0, 1], signal)
        axes[0, 1].set_title("backpropagated signal ‖∂L/∂y‖ by module (probe steps)")
        depth_axis(axes[0, 1], data.modules, "module, forward order")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def grad_heatmap(data: ReportData) -> Figure | None:
    """log10 gradient norm, parameter tensors x steps."""
    grads = data.series("grad_norm")
    if grads is None or len(data.steps) == 0 or not np.isfinite(grads).any():
        return None
    logs = log10(grads)
    col_edges = bins(len(data.steps), MAX_COLUMNS)
    row_edges = bins(logs.shape[1], MAX_ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_step = np.stack(
            [np.nanmean(logs[a:b], axis=0) for a, b in itertools.pairwise(col_edges)],
            axis=1,
        )
        cells = np.stack(
            [np.nanmean(by_step[a:b], axis=0) for a, b in itertools.pairwise(row_edges)]
        )
    fig, ax = plt.subplots(figsize=(12, min(2.5 + 0.08 * len(cells), 6)))
    steps = data.steps
    image = ax.imshow(
        cells,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0], steps[-1] + 1, len(cells), 0),
    )
    fig.colorbar(image, ax=ax, label="log10 ‖g‖")
    ax.set_xlabel("step")
    ax.set_ylabel("parameter tensor (model order)")
    if len(cells) == len(data.tensors) and len(cells) <= 40:
        ax.set_yticks(
            np.arange(len(cells)) + 0.5, [plain_text(t["name"]) for t in data.tensors], fontsize=7
        )
    ax.set_title("gradient norm per tensor over steps")
    ax.grid(False)
    fig.tight_layout()
    return fig


def global_norm(data: ReportData) -> Figure | None:
    """Global gradient norm over steps, with clip / skip / rollback events marked."""
    norms = data.series("global_grad_norm")
    if norms is None or len(data.steps) == 0:
        return None
    fig, ax = plt.subplots(figsize=(12, 3.8))
    draw_series(ax, data.steps, norms, label="global gradient norm (pre-guard)")
    broken = np.flatnonzero(~np.isfinite(norms))
    if len(broken):  # NaN/Inf norms have no height: marked along the top
        finite = norms[np.isfinite(norms)]
        top = float(finite.max()) if len(finite) else 1.0
        shown = broken[:: max(1, len(broken) // MAX_POINTS)]
        ax.scatter(
            data.steps[shown],
            np.full(len(shown), top),
            marker="|",
            color="tab:red",
            label=f"non-finite norm ({len(broken)} steps)",
        )
    by_step = dict(zip(data.steps.tolist(), norms.tolist(), strict=True))
    marks = {"clip": ("o", "tab:orange"), "skip": ("x", "tab:red")}
    for kind, (marker, color) in marks.items():
        at = [e.step for e in data.events if e.kind == kind][:: max(1, len(data.events) // 2000)]
        if at:
            ys = [by_step.get(s, np.nan) for s in at]
            ax.scatter(
                at,
                ys,
                marker=marker,
                color=color,
                s=14,
                zorder=3,
                label=f"{kind} ({sum(e.kind == kind for e in data.events)})",
            )
    rollbacks = [e.step for e in data.events if e.kind == "rollback"]
    for i, step in enumerate(rollbacks):
        ax.axvline(
            step,
            color="tab:purple",
            ls="--",
            lw=1,
            label=f"rollback ({len(rollbacks)})" if i == 0 else None,
        )
    log_scale(ax, norms)
    ax.set_xlabel("step")
    ax.set_title("global gradient norm and guard events")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def logged_scalars(data: ReportData) -> Figure | None:
    """Loss and the other scalars logged with w.log."""
    names = data.user_scalars[:4]
    if not names:
        return None
    fig, axes = plt.subplots(
        len(names), 1, figsize=(12, 2.6 * len(names)), squeeze=False, sharex=True
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        draw_series(ax, data.steps, data.series(name))
        ax.set_ylabel(plain_text(name))
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("logged scalars")
    fig.tight_layout()
    return fig


def update_ratios(data: ReportData) -> Figure | None:
    """Median update-to-weight ratio ‖Δθ‖/‖θ‖ per tensor over the probe steps of the second half."""
    ratios = data.series("update_ratio")
    if ratios is None or not np.isfinite(ratios).any():
        return None
    half = ratios[len(ratios) // 2 :]
    if not np.isfinite(half).any():
        half = ratios
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(half, axis=0)
    names = [t["name"] for t in data.tensors]
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.plot(median, marker="o", lw=1)
    ax.axhspan(1e-4, 1e-2, color="tab:green", alpha=0.1, label="common range 1e-4 to 1e-2")
    log_scale(ax, median)
    ax.set_title("update-to-weight ratio per tensor (median over probe steps, second half)")
    depth_axis(ax, names, "parameter tensor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def activation_health(data: ReportData) -> Figure | str | None:
    """Dead and saturated shares per module (mean over the probe steps of the second half)."""
    dead, saturated = data.series("dead_frac"), data.series("saturated_frac")
    if dead is None or not (np.isfinite(dead).any() or np.isfinite(saturated).any()):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dead_mean = np.nan_to_num(np.nanmean(dead[len(dead) // 2 :], axis=0))
        sat_mean = np.nan_to_num(np.nanmean(saturated[len(saturated) // 2 :], axis=0))
    if not (dead_mean.any() or sat_mean.any()):
        return (
            "No dead or saturated units: on the probe steps of the second half, no module had "
            "an output unit that was always 0, nor a sigmoid/tanh output pinned at its limits."
        )
    x = np.arange(len(data.modules))
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(x - 0.2, dead_mean, width=0.4, label="dead units (output always 0)")
    ax.bar(x + 0.2, sat_mean, width=0.4, label="saturated outputs (sigmoid/tanh)")
    ax.set_ylim(0, 1)
    ax.set_title("activation health per module (probe steps, second half)")
    depth_axis(ax, data.modules, "module, forward order")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def grad_distribution(data: ReportData) -> Figure | None:
    """log10|g| over probe steps for the first, middle and last weight tensors, as TensorBoard's
    distributions: the share of entries per bin, one column per probe step; the exact zeros'
    share in each title."""
    counts = data.grad_hist[1]
    rows = np.flatnonzero(np.isfinite(counts).all(axis=2).any(axis=1)) if counts.size else []
    if not len(rows):
        return None
    weights = data.weight_columns
    chosen = list(dict.fromkeys([weights[0], weights[len(weights) // 2], weights[-1]]))
    finite = finite_edges("grad_hist")
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 4), squeeze=False)
    image = None
    for ax, column in zip(axes[0], chosen, strict=True):
        picked = rows[np.isfinite(counts[rows, column]).all(axis=1)]
        if not len(picked):
            continue
        share = counts[picked, column] / counts[picked, column].sum(axis=1, keepdims=True)
        steps = data.steps[picked]
        x = np.append(steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
        with np.errstate(divide="ignore"):
            image = ax.pcolormesh(x, finite, np.log10(share.T), cmap="viridis", vmin=-4, vmax=0)
        filled = np.flatnonzero(np.nansum(share[:, 1:], axis=0)) + 1  # bins past the zeros
        if len(filled):
            ax.set_ylim(finite[filled[0]] - 0.5, finite[filled[-1] + 1] + 0.5)
        zeros = float(np.nanmedian(share[:, 0]))
        ax.set_title(
            f"{plain_text(data.tensors[column]['name'])}: {zeros:.0%} exact zeros", fontsize=9
        )
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("log10 |g|")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="log10 share of entries")
    fig.suptitle("distribution of log10|g| over probe steps (first, middle, last weight)")
    return fig


def tiny_gradients(data: ReportData) -> Figure | None:
    """Per tensor, the share of gradient entries that are exact zeros, and of those below fp16's
    smallest normal number (median over probe steps)."""
    edges, counts = data.grad_hist
    if not counts.size or not np.isfinite(counts).all(axis=2).any():
        return None
    totals = counts.sum(axis=2)
    below_fp16 = np.searchsorted(edges, np.log10(np.finfo(np.float16).tiny), side="right") - 1
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        zeros = np.nanmedian(counts[:, :, 0] / totals, axis=0)
        tiny = np.nanmedian(counts[:, :, 1:below_fp16].sum(axis=2) / totals, axis=0)
    x = np.arange(len(data.tensors))
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(x - 0.2, np.nan_to_num(zeros), width=0.4, label="exact zeros")
    ax.bar(
        x + 0.2, np.nan_to_num(tiny), width=0.4, label="0 < |g| < 6.1e-5 (fp16's smallest normal)"
    )
    ax.set_ylim(0, 1)
    ax.set_title("zero and tiny gradient entries per tensor (median over probe steps)")
    depth_axis(ax, [t["name"] for t in data.tensors], "parameter tensor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


Chart = Callable[[ReportData], Figure | str | None]
CHARTS: dict[str, tuple[str, Chart]] = {
    "gradient_flow": ("Gradient flow", gradient_flow),
    "heatmap": ("Gradient norm, layer x step", grad_heatmap),
    "global_norm": ("Global gradient norm and guard events", global_norm),
    "scalars": ("Loss and logged scalars", logged_scalars),
    "update_ratio": ("Update-to-weight ratio", update_ratios),
    "activation_health": ("Activation health", activation_health),
    "grad_distribution": ("Gradient distribution over steps", grad_distribution),
    "tiny_gradients": ("Zero and tiny gradient entries", tiny_gradients),
}
# Charts for what only some models have: shown when the run holds their data, else left out.
OPTIONAL_CHARTS: dict[str, tuple[str, Chart]] = {
    "through_time": ("Gradient through time (recurrent modules)", through_time),
    "per_example": ("Per-example gradient norms and the noise scale", per_example),
    "attention": ("Attention logits and entropy, output log Z (transformers)", attention),
}


def render_png(data: ReportData) -> dict[str, bytes | str | None]:
    """Every chart of the run by id: PNG bytes, the sentence that stands for an empty chart, or
    None where the run holds nothing to draw."""
    pngs: dict[str, bytes | str | None] = {}
    with plt.rc_context(STYLE):
        for chart_id, (_, draw) in {**CHARTS, **OPTIONAL_CHARTS}.items():
            fig = draw(data)
            if fig is None or isinstance(fig, str):
                pngs[chart_id] = fig
                continue
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            plt.close(fig)
            pngs[chart_id] = buffer.getvalue()
    return pngs
