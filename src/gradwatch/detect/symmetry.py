"""Units that start identical and stay so (`symmetric_weights`), from the per-tensor
`row_spread` (`stats/grads.py`): an exact condition, like the other wiring detectors
(`wiring.py`), so the threshold only absorbs rounding.
"""

from __future__ import annotations

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory, streak
from gradwatch.detect.wiring import PERSISTENT_PROBES, probe_rows
from gradwatch.stats.buffer import StatsBlock

# ‖W − mean row‖ / ‖W‖ at or below this (float32 rounding of equal rows).
SYMMETRIC_SPREAD = 1e-6


def symmetric_weights(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """A weight whose rows (the units of its layer) are identical (`row_spread` at most
    SYMMETRIC_SPREAD, the weight non-zero) on PERSISTENT_PROBES probe steps in a row.

    A real problem: identical units compute the same output and receive the same gradient, so
    they stay identical and the layer acts as one unit. A constant init does it. A zero-initialised
    output head is not named: its rows get different gradients and differ after one step.
    """
    if "row_spread" not in block.tensor_stats:
        return []
    spreads, params = block.tensor_series("row_spread"), block.tensor_series("param_norm")
    found: dict[str, dict[int, tuple[int, float]]] = {}
    for r in probe_rows(block):
        step = int(block.steps[r])
        for t in layout.weight_tensors():
            spread = spreads[r, t]
            if not np.isfinite(spread):
                continue
            holds = bool(spread <= SYMMETRIC_SPREAD and params[r, t] > 0)
            first = streak(memory, t, step, holds, PERSISTENT_PROBES)
            if first is not None:
                found.setdefault(layout.tensor_modules[t], {})[t] = (first, float(spread))
    findings = []
    for module, tensors in found.items():
        names = [layout.tensors[t] for t in sorted(tensors)]
        rows = ", ".join(repr(n) for n in names)
        findings.append(
            Finding(
                kind="symmetric_weights",
                layer=module,
                step=min(first for first, _ in tensors.values()),
                last_step=int(block.steps[-1]),
                severity="error",
                message=(
                    f"every unit of {module!r} has the same weights ({rows}: rows equal to "
                    f"within {max(s for _, s in tensors.values()):.1e} of the weight's norm) for "
                    f"{PERSISTENT_PROBES}+ probe steps in a row: identical units get identical "
                    "gradients, so they never differentiate and the layer works as a single "
                    "unit. Likely cause: a constant initialisation (nn.init.constant_, ones_, "
                    "zeros_ or fill_) of this layer."
                ),
                evidence={"tensors": names, "row_spread": max(s for _, s in tensors.values())},
                remedy=(
                    f"initialise {module!r} randomly: keep PyTorch's default init, or use "
                    "nn.init.kaiming_uniform_/xavier_uniform_ (zeros are fine for biases and "
                    "for the output head only)"
                ),
            )
        )
    return findings
