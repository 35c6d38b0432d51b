"""Detector of gradient-norm spikes: `spike`, a global norm far above its running level that comes
back within a few steps (one that stays up is a new regime, not a spike)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory
from gradwatch.stats.buffer import StatsBlock

# spike: robust z-score over a running window of log10 global norms, and a minimum jump.
SPIKE_WINDOW = 200
SPIKE_MIN_HISTORY = 20
SPIKE_Z = 6.0
SPIKE_MIN_RATIO = 3.0
# spike: a candidate is confirmed when the next this-many recorded norms have come back.
SPIKE_CONFIRM = 5
# spike: the steps of this many spikes are kept (and shown); the count goes on.
SPIKE_STEPS_KEPT = 50


def _leading_tensor(grads: np.ndarray, row: int, layout: ModelLayout) -> str | None:
    """The tensor whose gradient norm jumped most at `row`, relative to its block median."""
    with np.errstate(divide="ignore", invalid="ignore"):
        jump = grads[row] / np.nanmedian(grads, axis=0)
    return layout.tensors[int(np.nanargmax(jump))] if np.isfinite(jump).any() else None


def spike(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The global gradient norm jumps far above its running level (robust z-score of log10
    norms over the last SPIKE_WINDOW recorded steps, median and MAD) and comes back.

    A real problem when it is transient: a candidate becomes a spike only once the median of the
    next SPIKE_CONFIRM recorded norms lies below SPIKE_MIN_RATIO times the level it jumped from.
    A norm that stays up is a new regime (a new data phase, a warm restart that raises the
    loss), which the running window absorbs: no finding. So a spike is reported SPIKE_CONFIRM
    recorded steps after it happened, and one in the run's last SPIKE_CONFIRM steps is not.
    """
    found = _confirmed_spikes(block, layout, memory)
    if not found:
        return []
    memory["count"] = memory.get("count", 0) + len(found)
    steps = memory.setdefault("steps", [])  # the first SPIKE_STEPS_KEPT, as the evidence shows
    steps.extend(c["step"] for c in found)
    del steps[SPIKE_STEPS_KEPT:]
    return [_spike_finding(found, memory)]


def _confirmed_spikes(
    block: StatsBlock, layout: ModelLayout, memory: Memory
) -> list[dict[str, Any]]:
    """The spike candidates of earlier steps that this block confirms (the norm came back), in
    step order; new candidates wait in `memory["pending"]`."""
    history: deque[float] = memory.setdefault("history", deque(maxlen=SPIKE_WINDOW))
    pending: list[dict[str, Any]] = memory.setdefault("pending", [])
    norms = block.scalar("global_grad_norm")
    grads = block.tensor_series("grad_norm")
    came_back = np.log10(SPIKE_MIN_RATIO)
    found = []
    for r, (step, norm) in enumerate(zip(block.steps, norms, strict=True)):
        if not (np.isfinite(norm) and norm > 0):
            continue
        x = float(np.log10(norm))
        for candidate in pending:
            candidate["after"].append(x)
        waiting = [c for c in pending if len(c["after"]) < SPIKE_CONFIRM]
        found += [
            c
            for c in pending
            if len(c["after"]) >= SPIKE_CONFIRM
            and float(np.median(c["after"])) - c["level"] < came_back
        ]
        pending[:] = waiting
        if len(history) >= SPIKE_MIN_HISTORY:
            level = float(np.median(history))
            spread = 1.4826 * float(np.median(np.abs(np.array(history) - level))) + 1e-3
            z = (x - level) / spread
            if z > SPIKE_Z and x - level > came_back:
                pending.append(
                    {
                        "step": int(step),
                        "norm": float(norm),
                        "ratio": 10 ** (x - level),
                        "z": z,
                        "level": level,
                        "leader": _leading_tensor(grads, r, layout),
                        "after": [],
                    }
                )
        history.append(x)
    return found


def _spike_finding(found: list[dict[str, Any]], memory: Memory) -> Finding:
    """The finding of the spikes confirmed in a block (the count and steps run over the run)."""
    worst = max(found, key=lambda c: c["ratio"])
    top = worst["leader"]
    return Finding(
        kind="spike",
        layer="",
        step=found[0]["step"],
        last_step=found[-1]["step"],
        severity="warning",
        message=(
            f"{memory['count']} gradient-norm spikes so far; the largest at step "
            f"{worst['step']}: {worst['norm']:.3g}, {worst['ratio']:.1f}x the running level "
            f"(robust z = {worst['z']:.0f}), back to its level within {SPIKE_CONFIRM} steps"
            + (f", led by {top!r}" if top else "")
            + ". Likely cause: an outlier or corrupted "
            "batch, or a learning rate at the edge of stability."
        ),
        evidence={
            "count": memory["count"],
            "steps": memory["steps"],
            "largest_ratio": worst["ratio"],
            "largest_step": worst["step"],
            "leading_tensor": top,
        },
        remedy=(
            "cap spikes with gw.guards.ZClip() (or ClipNorm), check the batches at these "
            "steps, and lower the learning rate or lengthen warm-up"
        ),
    )
