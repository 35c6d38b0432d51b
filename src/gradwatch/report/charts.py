"""Matplotlib figures of a run: gradient flow, layer x step heatmap, global norm with guard events,
logged scalars, update-to-weight ratios, activation health, the distribution of log10|g| over
steps and the share of zero or tiny gradient entries; for models that have them, the gradient
through time of recurrent modules.

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

from gradwatch.report.data import ReportData
from gradwatch.stats.histograms import finite_edges

MAX_POINTS = 1500
MAX_COLUMNS = 400
MAX_ROWS = 200
MAX_RECURRENT = 4  # recurrent modules drawn in the gradient-through-time chart
MAX_ATTENTION = 12  # attention modules drawn in the attention chart
STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3}


def _label(name: str) -> str:
    """A name as plain text: a "$" in a module name must not start mathtext."""
    return name.replace("$", r"\$")


def _bins(n: int, count: int) -> np.ndarray:
    """Edges of at most `count` contiguous bins over n items."""
    return np.unique(np.linspace(0, n, min(n, count) + 1).astype(int))


def _binned(steps: np.ndarray, values: np.ndarray, count: int = MAX_POINTS):
    """(bin steps, median, min, max) of a [steps] or [steps, k] series, NaN-aware."""
    edges = _bins(len(steps), count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        parts = [values[a:b] for a, b in itertools.pairwise(edges)]
        median = np.array([np.nanmedian(p, axis=0) for p in parts])
        low = np.array([np.nanmin(p, axis=0) for p in parts])
        high = np.array([np.nanmax(p, axis=0) for p in parts])
    return steps[edges[:-1]], median, low, high


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def _windows(data: ReportData, series: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Median profiles over the early, middle and late tenth of the steps with data."""
    rows = np.flatnonzero(np.isfinite(series).any(axis=1))
    if len(rows) == 0:
        return []
    width = max(1, len(rows) // 10)
    picks = {
        "early": rows[:width],
        "middle": rows[len(rows) // 2 - width // 2 :][:width],
        "late": rows[-width:],
    }
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for label, chosen in picks.items():
            first, last = data.steps[chosen[0]], data.steps[chosen[-1]]
            out.append((f"{label} (steps {first}-{last})", np.nanmedian(series[chosen], axis=0)))
    return out


def _log_scale(ax, values: np.ndarray) -> None:
    """Log y axis when there is a positive value to show (all-zero gradients stay linear)."""
    if np.nanmax(np.where(np.isfinite(values), values, np.nan), initial=0) > 0:
        ax.set_yscale("log")


def _depth_axis(ax, names: list[str], label: str) -> None:
    ax.set_xlabel(f"{label} (input side left, output side right)")
    if len(names) <= 30:
        ax.set_xticks(
            range(len(names)), [_label(n) for n in names], rotation=60, ha="right", fontsize=7
        )


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
    for label, profile in _windows(data, grads[:, columns]):
        axes[0, 0].plot(profile, marker=".", label=label)
    _log_scale(axes[0, 0], grads[:, columns])
    axes[0, 0].set_title("weight gradient norm ‖∂L/∂W‖ by layer")
    _depth_axis(axes[0, 0], names, "parameter tensor")
    axes[0, 0].legend(fontsize=8)
    if has_signal:
        for label, profile in _windows(data, signal):
            axes[0, 1].plot(profile, marker=".", label=label)
        _log_scale(axes[0, 1], signal)
        axes[0, 1].set_title("backpropagated signal ‖∂L/∂y‖ by module (probe steps)")
        _depth_axis(axes[0, 1], data.modules, "module, forward order")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def grad_heatmap(data: ReportData) -> Figure | None:
    """log10 gradient norm, parameter tensors x steps."""
    grads = data.series("grad_norm")
    if grads is None or len(data.steps) == 0 or not np.isfinite(grads).any():
        return None
    logs = _log10(grads)
    col_edges = _bins(len(data.steps), MAX_COLUMNS)
    row_edges = _bins(logs.shape[1], MAX_ROWS)
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
            np.arange(len(cells)) + 0.5, [_label(t["name"]) for t in data.tensors], fontsize=7
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
    _series(ax, data.steps, norms, label="global gradient norm (pre-guard)")
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
    _log_scale(ax, norms)
    ax.set_xlabel("step")
    ax.set_title("global gradient norm and guard events")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _series(ax, steps: np.ndarray, values: np.ndarray, label: str | None = None) -> None:
    """One series over steps: every step recorded, a min-max band and the binned median; some
    steps only, their points (at most MAX_POINTS, evenly picked) joined by a thin line."""
    recorded = np.flatnonzero(np.isfinite(values))
    if len(recorded) == len(values):
        at, median, low, high = _binned(steps, values)
        ax.fill_between(at, low, high, alpha=0.25)
        ax.plot(at, median, lw=1, label=label)
        return
    if len(recorded):
        picked = recorded[np.unique(np.linspace(0, len(recorded) - 1, MAX_POINTS).astype(int))]
        few = len(picked) < 10
        ax.plot(steps[picked], values[picked], marker="o" if few else ".", ms=6 if few else 4,
                lw=0.6, label=label)  # fmt: skip
    stride = int(np.median(np.diff(steps[recorded]))) if len(recorded) > 1 else 1
    last = int(steps[recorded[-1]]) if len(recorded) else None
    if last is None or int(steps[-1]) - last > max(10, 3 * stride):
        ax.text(
            0.99,
            0.9,
            "no finite value" + ("" if last is None else f" after step {last}"),
            transform=ax.transAxes,
            ha="right",
            color="tab:red",
        )


def logged_scalars(data: ReportData) -> Figure | None:
    """Loss and the other scalars logged with w.log."""
    names = data.user_scalars[:4]
    if not names:
        return None
    fig, axes = plt.subplots(
        len(names), 1, figsize=(12, 2.6 * len(names)), squeeze=False, sharex=True
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        _series(ax, data.steps, data.series(name))
        ax.set_ylabel(_label(name))
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
    _log_scale(ax, median)
    ax.set_title("update-to-weight ratio per tensor (median over probe steps, second half)")
    _depth_axis(ax, names, "parameter tensor")
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
    _depth_axis(ax, data.modules, "module, forward order")
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
        ax.set_title(f"{_label(data.tensors[column]['name'])}: {zeros:.0%} exact zeros", fontsize=9)
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
    _depth_axis(ax, [t["name"] for t in data.tensors], "parameter tensor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
        _log_scale(axes[0], largest[rows])
        axes[0].legend(fontsize=8)
    axes[0].set_title("per-example gradient norm ‖∇ℓ_i‖ (probe steps)")
    axes[0].set_xlabel("step")
    if scale:
        known = np.isfinite(noise)
        axes[1].plot(data.steps[known], noise[known], marker=".", label="B_simple (EMA)")
        sized = np.isfinite(batch)
        axes[1].plot(data.steps[sized], batch[sized], ls="--", label="batch size")
        _log_scale(axes[1], noise[known])
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
        for label, line in _windows(data, profile):
            ax.plot(line, marker=".", label=label)
        _log_scale(ax, profile)
        ax.set_title(f"{_label(name)} ({types.get(name, '?')}): ‖∂L/∂x_t‖ (probe steps)")
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
        axes[0].plot(data.steps[rows], largest[rows, c], marker=".", label=_label(name))
        axes[1].plot(data.steps[rows], entropy[rows, c], marker=".", label=_label(name))
    _log_scale(axes[0], largest)
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
