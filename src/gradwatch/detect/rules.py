"""Detectors: one function per finding kind, from a statistics block to findings.

Every rule has the signature `rule(block, layout, memory) -> list[Finding]`; `memory` is a dict the
rule keeps across the blocks of one run (running windows, streaks). Rules run in the writer thread
on host arrays, never in the training step. Thresholds are module constants, named and documented.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from gradwatch.detect.examples import batch_size, outlier_examples
from gradwatch.detect.findings import Finding
from gradwatch.detect.instabilities import adam_epsilon, attention_logit_growth, logit_divergence
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.precision import underflow
from gradwatch.detect.recipe import (
    batchnorm_small_batch,
    clip_always,
    input_scale,
    learning_rate,
    probabilities_as_logits,
)
from gradwatch.detect.streaks import streak
from gradwatch.detect.through_time import exploding_through_time, vanishing_through_time
from gradwatch.detect.wiring import no_gradient, not_updated, stale_gradients, symmetric_weights
from gradwatch.stats.buffer import StatsBlock

# vanishing / exploding: log10 of (gradient scale at the first layer / at the last layer).
DEPTH_ORDERS = 3.0
# dead_units / saturation: share of units, held for this many consecutive probe steps.
DEAD_FRAC = 0.5
SATURATED_FRAC = 0.5
PERSISTENT_PROBES = 3
# exploding: the global norm's block median above this many times its level in the first block.
GLOBAL_GROWTH = 1e3
# spike: robust z-score over a running window of log10 global norms, and a minimum jump.
SPIKE_WINDOW = 200
SPIKE_MIN_HISTORY = 20
SPIKE_Z = 6.0
SPIKE_MIN_RATIO = 3.0
# spike: a candidate is confirmed when the next this-many recorded norms have come back.
SPIKE_CONFIRM = 5
# spike: the steps of this many spikes are kept (and shown); the count goes on.
SPIKE_STEPS_KEPT = 50

Memory = dict[str, Any]


def _names(layout: ModelLayout, columns: list[int], limit: int = 4) -> str:
    shown = ", ".join(repr(layout.modules[c]) for c in columns[:limit])
    return shown + (f" and {len(columns) - limit} more" if len(columns) > limit else "")


def depth_profile(block: StatsBlock, layout: ModelLayout) -> tuple[list[int], np.ndarray] | None:
    """log10 of each parameterised layer's gradient scale relative to the last layer's.

    The scale is the backpropagated signal ‖∂L/∂y‖ on probe steps, or, without probe data, the
    gradient norm of the layer's first parameter tensor. Median over the block's steps; None with
    fewer than 3 layers measured. Returns (module columns in forward order, profile).
    """
    columns = layout.layer_columns()
    scale = block.module_series("signal_norm")[:, columns] if columns else np.zeros((0, 0))
    if not np.isfinite(scale).any():
        first_tensor = {m: i for i, m in reversed(list(enumerate(layout.tensor_modules)))}
        columns = [c for c in columns if layout.modules[c] in first_tensor]
        tensor_columns = [first_tensor[layout.modules[c]] for c in columns]
        scale = block.tensor_series("grad_norm")[:, tensor_columns]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where((scale > 0) & np.isfinite(scale), np.log10(scale), np.nan)
        keep = np.isfinite(logs).any(axis=0)
        columns, logs = [c for c, k in zip(columns, keep, strict=True) if k], logs[:, keep]
        if len(columns) < 3:
            return None
        rows = np.isfinite(logs[:, -1])
        if not rows.any():
            return None
        profile = np.nanmedian(logs[rows] - logs[rows, -1:], axis=0)
    return columns, profile


def vanishing(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The gradient scale falls by DEPTH_ORDERS or more from the last layer to the first.

    A real problem when the first layers barely learn compared with the last. The measure is
    relative across depth (the block's median), so what scales every layer alike does not tempt
    it: a converged run, a small or decaying learning rate. Layers whose gradient is not
    measured do not count: frozen ones (no gradient, no signal past them) and those no loss
    reaches; at least 3 measured layers are needed.
    """
    measured = depth_profile(block, layout)
    if measured is None or measured[1][0] > -DEPTH_ORDERS:
        return []
    columns, profile = measured
    per_layer = 10 ** (profile[0] / (len(columns) - 1))
    weak = [c for c, p in zip(columns, profile, strict=True) if p <= -DEPTH_ORDERS]
    start = next(c for c, p in zip(reversed(columns), profile[::-1], strict=True) if p <= -1)
    causes = []
    saturating = sorted({layout.module_types[i] for i, s in enumerate(layout.saturating) if s})
    if saturating:
        causes.append(
            f"saturating {'/'.join(saturating)} activations (derivative at most 0.25 "
            "for sigmoid, near 0 once saturated) shrink it at every layer"
        )
    if not any("Norm" in t for t in layout.module_types):
        causes.append("no normalization layers or residual connections carry it through depth")
    causes.append("the weight init may be too small for this depth")
    return [
        Finding(
            kind="vanishing",
            layer=layout.modules[columns[0]],
            step=int(block.steps[0]),
            last_step=int(block.steps[-1]),
            severity="error" if profile[0] <= -2 * DEPTH_ORDERS else "warning",
            message=(
                f"the backpropagated gradient shrinks by {per_layer:.2g}x per layer over "
                f"{len(columns)} layers: at {layout.modules[columns[0]]!r} it is "
                f"{10 ** profile[0]:.1e} of its size at {layout.modules[columns[-1]]!r}; it falls "
                f"below a tenth from {layout.modules[start]!r} on, and {len(weak)} layers "
                f"({_names(layout, weak)}) get under 1/1000, so they barely learn. Likely cause: "
                + "; ".join(causes)
                + "."
            ),
            evidence={
                "decay_per_layer": float(per_layer),
                "first_to_last": float(10 ** profile[0]),
                "starts_at": layout.modules[start],
                "relative_scale": {
                    layout.modules[c]: float(10**p) for c, p in zip(columns, profile, strict=True)
                },
            },
            remedy=(
                "use ReLU/GELU activations with He init (nn.init.kaiming_normal_), add LayerNorm/"
                "BatchNorm or residual connections across the deep stack, or make the net shallower"
            ),
        )
    ]


def exploding(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The gradient scale grows by DEPTH_ORDERS or more from the last layer to the first, or the
    global norm climbs GLOBAL_GROWTH-fold above its level in the run's first block.

    A real problem when the gradient multiplies through depth (relative across layers, like
    `vanishing`) or grows by three orders over the run: both judged on a whole block's median,
    so a warm-up from a learning rate near 0, a restart or a single outlier batch (that is
    `spike`) does not reach them.
    """
    findings = []
    measured = depth_profile(block, layout)
    if measured is not None and measured[1][0] >= DEPTH_ORDERS:
        columns, profile = measured
        per_layer = 10 ** (profile[0] / (len(columns) - 1))
        findings.append(
            Finding(
                kind="exploding",
                layer=layout.modules[columns[0]],
                step=int(block.steps[0]),
                last_step=int(block.steps[-1]),
                severity="error",
                message=(
                    f"the backpropagated gradient grows by {per_layer:.2g}x per layer over "
                    f"{len(columns)} layers: at {layout.modules[columns[0]]!r} it is "
                    f"{10 ** profile[0]:.1e} times its size at {layout.modules[columns[-1]]!r}. "
                    "Likely cause: weights initialised too large for their fan-in (each layer "
                    "multiplies the signal), or no normalization between layers."
                ),
                evidence={
                    "growth_per_layer": float(per_layer),
                    "first_to_last": float(10 ** profile[0]),
                },
                remedy=(
                    "initialise with nn.init.kaiming_normal_ (std = sqrt(2/fan_in)) or xavier, add "
                    "normalization layers, and clip gradients (gw.guards.ClipNorm or ZClip)"
                ),
            )
        )
    norms = block.scalar("global_grad_norm")
    finite = norms[np.isfinite(norms) & (norms > 0)]
    if finite.size and "reference" not in memory:
        memory["reference"] = float(np.median(finite))
    if finite.size and np.median(finite) > GLOBAL_GROWTH * memory["reference"]:
        level = float(np.median(finite))
        findings.append(
            Finding(
                kind="exploding",
                layer="",
                step=int(block.steps[0]),
                last_step=int(block.steps[-1]),
                severity="error",
                message=(
                    f"the global gradient norm rose to {level:.3g}, "
                    f"{level / memory['reference']:.2g}x its level at the start of the run "
                    f"({memory['reference']:.3g}). Likely cause: a learning rate too high for this "
                    "model, so updates feed on themselves."
                ),
                evidence={"global_grad_norm": level, "start_level": memory["reference"]},
                remedy="lower the learning rate or add warm-up; clip gradients (gw.guards.ZClip)",
            )
        )
    return findings


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


def _nonfinite_finding(block, layout, row, step, origin, direction, bad_tensors) -> Finding:
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


def _persistent(
    block: StatsBlock, stat: str, columns: list[int], threshold: float, memory: Memory
) -> list[tuple[int, int, int, float]]:
    """Columns whose `stat` stayed >= threshold for PERSISTENT_PROBES consecutive probe steps:
    (column, first step of the streak, last step, latest value). Streaks carry across blocks."""
    values = block.module_series(stat)
    hits = []
    for r, step in enumerate(block.steps):
        for c in columns:
            v = values[r, c]
            if np.isnan(v):
                continue  # not a probe step, or not measured
            first = streak(memory, c, int(step), bool(v >= threshold), PERSISTENT_PROBES)
            if first is not None:
                hits.append((c, first, int(step), float(v)))
    latest = {c: (c, first, last, v) for c, first, last, v in hits}
    return list(latest.values())


def dead_units(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """A ReLU-family activation whose units output 0 for whole batches, step after step.

    A problem only where it starves training (`ModelLayout.starves_training`): a hidden
    activation with trainable parameters upstream; never at the model's output.
    """
    columns = [c for c, z in enumerate(layout.zeroing) if z and layout.starves_training(c)]
    findings = []
    for c, first, last, share in _persistent(block, "dead_frac", columns, DEAD_FRAC, memory):
        layer = layout.feeding_layer(c)
        findings.append(
            Finding(
                kind="dead_units",
                layer=layout.modules[layer],
                step=first,
                last_step=last,
                severity="error" if share >= 0.99 else "warning",
                message=(
                    f"{share:.0%} of the units of {layout.modules[c]!r} ({layout.module_types[c]}, "
                    f"after {layout.modules[layer]!r}) output 0 for every example of the batch, "
                    "for "
                    f"{PERSISTENT_PROBES}+ probe steps in a row: they pass no gradient and stop "
                    "learning. Likely cause: pre-activations pushed below zero by a large negative "
                    "bias, a too-high learning rate or unnormalised inputs."
                ),
                evidence={"dead_frac": share, "activation": layout.modules[c]},
                remedy=(
                    f"initialise the bias of {layout.modules[layer]!r} at 0 (or slightly "
                    "positive), "
                    "lower the learning rate, normalise its input (BatchNorm/LayerNorm), or use "
                    "LeakyReLU/GELU, which keep a gradient below zero"
                ),
            )
        )
    return findings


def saturation(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """A sigmoid/tanh-family activation with most outputs at its bounds, step after step.

    A problem only where it starves training (`ModelLayout.starves_training`): a hidden
    activation with trainable parameters upstream. A sigmoid output layer trained with BCE is
    confident, not saturated in that sense: the gradient at its logit is p − y.
    """
    columns = [c for c, s in enumerate(layout.saturating) if s and layout.starves_training(c)]
    findings = []
    for c, first, last, share in _persistent(
        block, "saturated_frac", columns, SATURATED_FRAC, memory
    ):
        layer = layout.feeding_layer(c)
        findings.append(
            Finding(
                kind="saturation",
                layer=layout.modules[c],
                step=first,
                last_step=last,
                severity="warning",
                message=(
                    f"{share:.0%} of the outputs of {layout.modules[c]!r} "
                    f"({layout.module_types[c]}) sit within 1% of its bounds for "
                    f"{PERSISTENT_PROBES}+ probe steps in a row: its "
                    "derivative there is near 0, so little gradient flows back. Likely cause: its "
                    f"input from {layout.modules[layer]!r} is too large (weights, inputs or lr)."
                ),
                evidence={"saturated_frac": share, "fed_by": layout.modules[layer]},
                remedy=(
                    f"scale down the input of {layout.modules[c]!r} (smaller init or inputs, a "
                    "normalization layer before it), or use a non-saturating activation (ReLU/GELU)"
                ),
            )
        )
    return findings


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
    if not found:
        return []
    memory["count"] = memory.get("count", 0) + len(found)
    steps = memory.setdefault("steps", [])  # the first SPIKE_STEPS_KEPT, as the evidence shows
    steps.extend(c["step"] for c in found)
    del steps[SPIKE_STEPS_KEPT:]
    worst = max(found, key=lambda c: c["ratio"])
    top = worst["leader"]
    return [
        Finding(
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
    ]


RULES = (
    vanishing,
    exploding,
    vanishing_through_time,
    exploding_through_time,
    nonfinite,
    dead_units,
    saturation,
    spike,
    underflow,
    batch_size,
    outlier_examples,
    attention_logit_growth,
    logit_divergence,
    adam_epsilon,
    stale_gradients,
    no_gradient,
    not_updated,
    probabilities_as_logits,
    clip_always,
    learning_rate,
    input_scale,
    batchnorm_small_batch,
    symmetric_weights,
)
