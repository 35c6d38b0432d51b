"""Detectors of unhealthy activations that starve training: `dead_units` (ReLU units that never
fire) and `saturation` (sigmoid/tanh outputs pinned at their bounds)."""

from __future__ import annotations

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory, streak
from gradwatch.stats.buffer import StatsBlock

# dead_units / saturation: share of units, held for this many consecutive probe steps.
DEAD_FRAC = 0.5
SATURATED_FRAC = 0.5
PERSISTENT_PROBES = 3


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
