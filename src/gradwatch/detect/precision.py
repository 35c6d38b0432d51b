"""The `underflow` detector: low precision eating a layer's gradient.

In fp16 the smallest normal number is 6.1e-5 and everything below 6e-8 is 0; a layer whose
backpropagated gradient is small loses it to zeros, unless the loss is scaled
(`torch.amp.GradScaler`). The rule reads the probe steps' `grad_hist` (log10|g| per tensor, see
`stats/histograms.py`): the share of a tensor's gradient entries that are lost, namely

- exact zeros, where the layer trains in fp16 (under autocast the parameters and their
  gradients are fp32, but the backward ran in fp16, so what underflowed arrives as an exact 0).
  Not in bf16: it has fp32's exponent range, so its exact zeros are structural (the columns of
  inputs that are 0, as absent words in a bag of words), the same zeros fp32 would have,
- and entries below the smallest normal of the gradient's own dtype when it is fp16 (bins up to
  10^-4.25) or bf16 (the bin below 1e-24),

minus the share that dead units explain (the `dead_frac` d of a ReLU right after the layer, whose
dead units zero their rows of its weight gradient, and d' of one right before it, whose dead units
zero their columns: 1 − (1 − d)(1 − d'); that is `dead_units`, not precision).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import streak
from gradwatch.stats.buffer import StatsBlock
from gradwatch.stats.histograms import GRAD_HIST_EDGES

# A tensor underflows when this share of its gradient entries is lost (beyond dead units) ...
UNDERFLOW_FRAC = 0.5
# ... while the median watched tensor loses at most this share: the precision, not the loss
# scale of the whole model (or a converged run), is eating this layer's gradient ...
OTHERS_FRAC = 0.1
# ... for this many probe steps in a row.
UNDERFLOW_PROBES = 3
# Per gradient dtype: histogram bins (after the zero bin) whose entries are below its smallest
# normal number: fp16's 6.1e-5 (bins whose upper edge is at most 10^-4.25), bf16's 1.2e-38 (the
# bin [1e-45, 1e-24)); for fp32 gradients only exact zeros count.
_SUBNORMAL_BINS = {
    "float16": int(np.searchsorted(GRAD_HIST_EDGES, np.log10(6.103515625e-05), side="right")) - 1,
    "bfloat16": 2,
}


def lost_shares(block: StatsBlock, layout: ModelLayout) -> tuple[np.ndarray, np.ndarray] | None:
    """(probe steps, lost share [probe steps, tensors]) for the low-precision tensors (NaN
    for the others and where no histogram was recorded); None without histograms."""
    array = block.arrays.get("grad_hist")
    if array is None or not array.data.size:
        return None
    position = {name: c for c, name in enumerate(array.columns)}
    columns = [position.get(t) for t in layout.tensors]
    counts = np.full((len(array.steps), len(layout.tensors), array.data.shape[2]), np.nan)
    for t, c in enumerate(columns):
        if c is not None:
            counts[:, t] = array.data[:, c]
    totals = counts.sum(axis=2)
    lost = np.zeros(counts.shape[:2])
    for t, dtype in enumerate(layout.tensor_dtypes):
        if layout.precision(t) == "float16":
            lost[:, t] += counts[:, t, 0]
        lost[:, t] += counts[:, t, 1 : _SUBNORMAL_BINS.get(dtype, 1)].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = lost / totals
    rows = np.searchsorted(block.steps, array.steps)
    dead = block.module_series("dead_frac")[rows]
    for t in range(len(layout.tensors)):
        if not layout.low_precision(t):
            shares[:, t] = np.nan
            continue
        # A dead unit zeroes its row of the weight feeding it and its column of the next one.
        live = np.ones(len(rows))
        for column in layout.zeroing_around(layout.tensor_modules[t]):
            live *= 1 - np.nan_to_num(dead[:, column])
        shares[:, t] -= 1 - live
    return array.steps, shares


def underflow(block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]) -> list[Finding]:
    """A layer trained in fp16/bf16 (its parameters, or its output under autocast) loses
    UNDERFLOW_FRAC or more of its gradient entries to zeros (or to subnormal numbers) for
    UNDERFLOW_PROBES probe steps in a row, while the median tensor loses at most OTHERS_FRAC.

    Also, for the whole model: the median fp16 tensor loses UNDERFLOW_FRAC or more from the
    run's first histogram step on, for UNDERFLOW_PROBES histogram steps (fp16 trained without a
    loss scale; a run whose gradients shrink as it converges starts above it, so it is not named).

    A real problem: those entries carry no update, so the layer learns from a fraction of its
    gradient. Never raised for fp32 training (exact zeros there are dead units or sparse
    inputs), nor for the zeros dead ReLU units explain, nor for bf16's exact zeros.
    """
    measured = lost_shares(block, layout)
    if measured is None:
        return []
    steps, shares = measured
    fp16 = any(layout.precision(t) == "float16" for t in range(len(layout.tensors)))
    found: dict[str, dict[int, tuple[int, float]]] = {}  # module -> tensor -> (first step, share)
    for r, step in enumerate(steps):
        row = shares[r]
        if not np.isfinite(row).any():
            continue
        typical = float(np.median(np.where(np.isfinite(row), row, 0.0)))
        whole = _whole_model(memory, int(step), typical) if fp16 else None
        if whole is not None:
            return [whole]
        for t, share in enumerate(row):
            holds = bool(share >= UNDERFLOW_FRAC and typical <= OTHERS_FRAC)
            first = streak(memory, t, int(step), holds, UNDERFLOW_PROBES)
            if first is not None:
                found.setdefault(layout.tensor_modules[t], {})[t] = (first, float(share))
    return [
        _layer_finding(module, tensors, layout, int(block.steps[-1]))
        for module, tensors in found.items()
    ]


def _layer_finding(
    module: str, tensors: dict[int, tuple[int, float]], layout: ModelLayout, last_step: int
) -> Finding:
    """`underflow` of `module`, from its tensors' (first step, lost share)."""
    share = max(share for _, share in tensors.values())
    precision = layout.precision(next(iter(tensors)))
    names = ", ".join(repr(layout.tensors[t]) for t in sorted(tensors))
    return Finding(
        kind="underflow",
        layer=module,
        step=min(first for first, _ in tensors.values()),
        last_step=last_step,
        severity="error" if share >= 0.9 else "warning",
        message=(
            f"{share:.0%} of the gradient entries of {names} are lost to {precision} "
            f"underflow (exact zeros, or below the smallest normal number) for "
            f"{UNDERFLOW_PROBES}+ probe steps in a row, while the median watched tensor "
            f"loses at most {OTHERS_FRAC:.0%}: this layer's gradient is too small for "
            f"{precision}, so it learns from a fraction of its gradient."
        ),
        evidence={
            "lost_share": share,
            "precision": precision,
            "tensors": [layout.tensors[t] for t in sorted(tensors)],
        },
        remedy=(
            "scale the loss with torch.amp.GradScaler (scaler.scale(loss).backward(), "
            "scaler.step(optimizer), scaler.update()), train in bf16 instead of fp16 "
            "(fp32's range), or keep this layer in fp32 (run it outside autocast)"
        ),
    )


def _whole_model(memory: dict[str, Any], step: int, typical: float) -> Finding | None:
    """The whole-model case of `underflow` for a model that trains in fp16: the median tensor
    loses UNDERFLOW_FRAC (`typical`) from the run's first histogram step on (see `underflow`)."""
    since_start = memory.get("whole_since_start", True) and typical >= UNDERFLOW_FRAC
    memory["whole_since_start"] = since_start
    first = streak(memory, "whole", step, since_start, UNDERFLOW_PROBES)
    if first is None:
        return None
    return Finding(
        kind="underflow",
        layer="",
        step=first,
        last_step=step,
        severity="error",
        message=(
            f"the median fp16 tensor loses {typical:.0%} of its gradient entries to fp16 "
            f"underflow (exact zeros, or below the smallest normal number 6.1e-5) on every "
            f"histogram step since the run began ({UNDERFLOW_PROBES}+): the whole model's "
            "gradients are too small for fp16, so it learns from a fraction of them. Likely "
            "cause: fp16 training without a loss scale."
        ),
        evidence={"median_lost_share": typical, "precision": "float16"},
        remedy=(
            "scale the loss with torch.amp.GradScaler (scaler.scale(loss).backward(), "
            "scaler.step(optimizer), scaler.update()), or train in bf16 instead of fp16"
        ),
    )
