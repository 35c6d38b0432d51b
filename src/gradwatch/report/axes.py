"""The drawing the charts (`charts.py`) share: names as plain text, steps in bins, median
profiles over windows of steps, log scales, the depth axis, and one series over steps.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np

from gradwatch.report.data import ReportData

MAX_POINTS = 1500


def plain_text(name: str) -> str:
    """A name as plain text: a "$" in a module name must not start mathtext."""
    return name.replace("$", r"\$")


def bins(n: int, count: int) -> np.ndarray:
    """Edges of at most `count` contiguous bins over n items."""
    return np.unique(np.linspace(0, n, min(n, count) + 1).astype(int))


def binned(steps: np.ndarray, values: np.ndarray, count: int = MAX_POINTS):
    """(bin steps, median, min, max) of a [steps] or [steps, k] series, NaN-aware."""
    edges = bins(len(steps), count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        parts = [values[a:b] for a, b in itertools.pairwise(edges)]
        median = np.array([np.nanmedian(p, axis=0) for p in parts])
        low = np.array([np.nanmin(p, axis=0) for p in parts])
        high = np.array([np.nanmax(p, axis=0) for p in parts])
    return steps[edges[:-1]], median, low, high


def log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def windows(data: ReportData, series: np.ndarray) -> list[tuple[str, np.ndarray]]:
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


def log_scale(ax, values: np.ndarray) -> None:
    """Log y axis when there is a positive value to show (all-zero gradients stay linear)."""
    if np.nanmax(np.where(np.isfinite(values), values, np.nan), initial=0) > 0:
        ax.set_yscale("log")


def depth_axis(ax, names: list[str], label: str) -> None:
    ax.set_xlabel(f"{label} (input side left, output side right)")
    if len(names) <= 30:
        ax.set_xticks(
            range(len(names)), [plain_text(n) for n in names], rotation=60, ha="right", fontsize=7
        )


def draw_series(ax, steps: np.ndarray, values: np.ndarray, label: str | None = None) -> None:
    """One series over steps: every step recorded, a min-max band and the binned median; some
    steps only, their points (at most MAX_POINTS, evenly picked) joined by a thin line."""
    recorded = np.flatnonzero(np.isfinite(values))
    if len(recorded) == len(values):
        at, median, low, high = binned(steps, values)
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
