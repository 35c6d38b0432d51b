"""Detector of non-finite values: `nonfinite` names the first module, in forward order, whose output
held NaN/Inf (or, in backward, where non-finite gradients start), with the likely cause."""

from __future__ import annotations

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory
from gradwatch.stats.buffer import StatsBlock


def nonfinite(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The first step where a module output (forward) or a gradient (backward) is NaN/Inf, and
    the module where it started: the first flagged module in forward order, or in backward the
    module after the last layer (in forward order) whose parameter gradients are non-finite.

    A real problem when NaN/Inf reach a recorded step: the optimizer was asked to apply them.
    A parameter without a gradient (`.grad` None: `grad_none`) is not non-finite, however its
    statistics read (NaN, "not recorded"): that is `no_gradient`.
    Steps that `torch.amp.GradScaler` skips on purpose (its loss scale overflowed) never call
    `optimizer.step()`, so gradwatch records nothing for them and raises nothing. Reported once
    per run, at the first step.
    """
    if memory.get("found"):
        return []
    flags = block.module_series("act_nonfinite")
    grads = block.tensor_series("grad_norm")
    present = block.tensor_series("grad_none") == 0  # known to have had a gradient
    column = {name: i for i, name in enumerate(layout.modules)}
    for r, step in enumerate(block.steps):
        bad_tensors = np.flatnonzero(~np.isfinite(grads[r]) & present[r])
        forward = np.flatnonzero(flags[r] > 0)
        if forward.size:
            origin, direction = int(forward[0]), "forward"
        elif bad_tensors.size:
            bad = [
                column[layout.tensor_modules[t]]
                for t in bad_tensors
                if layout.tensor_modules[t] in column
            ]
            last = max(bad) if bad else len(layout.modules) - 1
            origin, direction = min(last + 1, len(layout.modules) - 1), "backward"
        else:
            continue
        memory["found"] = True
        return [_nonfinite_finding(block, layout, r, int(step), origin, direction, bad_tensors)]
    return []


def _nonfinite_finding(
    block: StatsBlock,
    layout: ModelLayout,
    row: int,
    step: int,
    origin: int,
    direction: str,
    bad_tensors: np.ndarray,
) -> Finding:
    """The `nonfinite` finding of the module `origin`, where NaN/Inf started at `step` (block
    row `row`) in the `direction` pass; `bad_tensors` got non-finite gradients."""
    name, kind = layout.modules[origin], layout.module_types[origin]
    rank = None
    if direction == "forward":
        code = block.module_series("nonfinite_rank")[row, origin]
        rank = int(code) if np.isfinite(code) else None
    on_rank = f" on rank {rank}" if rank is not None and layout.world_size > 1 else ""
    # Probe rows are those with a non-finite count (a count is finite even for NaN gradients).
    probe_rows = np.isfinite(block.tensor_series("grad_nonfinite")[row:]).any(axis=1)
    params = block.tensor_series("param_norm")[row:][probe_rows]
    hit = [layout.tensors[t] for t in np.flatnonzero((~np.isfinite(params)).any(axis=0))]
    where = (
        f"the output of {name!r} ({kind}) is the first in forward order to hold NaN/Inf{on_rank}"
        if direction == "forward"
        else f"the gradient turned NaN/Inf in backward at {name!r} ({kind}): the layers before it "
        "received non-finite gradients, the layers after it did not"
    )
    touched = (
        f"parameters now non-finite: {', '.join(hit[:5])}"
        if hit
        else "parameters still finite at the probe steps of this block"
    )
    stds = block.module_series("act_std")[: row + 1]
    largest = float(np.nanmax(stds)) if np.isfinite(stds).any() else None
    cause, remedy = _cause_and_remedy(layout, origin, direction, step, on_rank, largest)
    return Finding(
        kind="nonfinite",
        layer=name,
        step=step,
        severity="error",
        message=f"at step {step} {where}; {len(bad_tensors)} parameter tensors got non-finite "
        f"gradients; {touched}. Likely cause: {cause}.",
        evidence={
            "direction": direction,
            "module_type": kind,
            "nonfinite_grad_tensors": [layout.tensors[t] for t in bad_tensors[:20]],
            "parameters_hit": hit[:20],
            "largest_act_std_before": largest,
            "rank": rank,
        },
        remedy=remedy + "; gw.guards.SkipNonFinite() skips such steps before they reach the "
        "weights",
    )


def _cause_and_remedy(
    layout: ModelLayout, origin: int, direction: str, step: int, on_rank: str, largest: float | None
) -> tuple[str, str]:
    """The likely cause and the remedy of a non-finite value that starts at module `origin`:
    the input batch (the first module), overflow (a built-in layer), or custom code."""
    name, kind = layout.modules[origin], layout.module_types[origin]
    if direction == "forward" and origin == 0:
        cause = (
            f"{name!r} is the first module of the forward pass, so the batch itself{on_rank} "
            "most likely held NaN/Inf (or the values overflowed in this first layer)"
        )
        remedy = (
            f"check the input batch of step {step}{on_rank} (torch.isfinite(x).all()) and the "
            "data pipeline that made it"
        )
    elif layout.builtin[origin]:
        cause = (
            f"a built-in {kind} makes NaN/Inf out of finite values only by overflow: the "
            "values reaching it grew too large"
            + (f" (largest activation std before: {largest:.3g})" if largest else "")
        )
        remedy = (
            "keep activations and updates bounded: fix the init scale or learning rate "
            "that makes them grow, add normalization, clip gradients (gw.guards.ZClip)"
        )
    else:
        cause = (
            f"{kind} is custom code: look for a log/sqrt/division of values that reach 0 or "
            "below, an exp that overflows, or fp16 overflow"
        )
        remedy = f"inspect {name!r} at step {step}; add an epsilon or clamp its input"
    return cause, remedy
