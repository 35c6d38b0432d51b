"""Detectors of a gradient that vanishes or explodes over the depth of the model: `vanishing`,
`exploding`, from the per-layer gradient scale (`depth_profile`)."""

from __future__ import annotations

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory
from gradwatch.stats.buffer import StatsBlock

# vanishing / exploding: log10 of (gradient scale at the first layer / at the last layer).
DEPTH_ORDERS = 3.0
# exploding: the global norm's block median above this many times its level in the first block.
GLOBAL_GROWTH = 1e3


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
    found = (_exploding_over_depth(block, layout), _exploding_over_time(block, memory))
    return [f for f in found if f is not None]


def _exploding_over_depth(block: StatsBlock, layout: ModelLayout) -> Finding | None:
    """`exploding` through the layers of this block, or None."""
    measured = depth_profile(block, layout)
    if measured is None or measured[1][0] < DEPTH_ORDERS:
        return None
    columns, profile = measured
    per_layer = 10 ** (profile[0] / (len(columns) - 1))
    return Finding(
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


def _exploding_over_time(block: StatsBlock, memory: Memory) -> Finding | None:
    """`exploding` of the global norm against its level in the run's first block, or None."""
    norms = block.scalar("global_grad_norm")
    finite = norms[np.isfinite(norms) & (norms > 0)]
    if finite.size and "reference" not in memory:
        memory["reference"] = float(np.median(finite))
    if not (finite.size and np.median(finite) > GLOBAL_GROWTH * memory["reference"]):
        return None
    level = float(np.median(finite))
    return Finding(
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
