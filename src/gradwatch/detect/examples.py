"""Detectors on per-example gradient norms (`gw.watch(..., per_example=True)`): the batch size
against the gradient noise scale, and examples that dominate the batch gradient.

Both read the scalars a probe step records (`gns_batch`, `gns_simple`, `pe_top_share`,
`pe_total_argmax`, see `stats/per_example.py` and `stats/noise_scale.py`). Without
`per_example`, B_simple comes from the step's micro-batches or DDP ranks when it has two or
more; otherwise those scalars are absent and the rules stay quiet.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.stats.buffer import StatsBlock

# batch_size: the batch is this factor below or above B_simple ...
BATCH_FACTOR = 10.0
# ... for this many consecutive estimates of B_simple, which agree within this factor (near a
# minimum |G|² falls towards 0 and the estimate swings by orders: 1.3e3 to 3e5 over 3 probe
# steps of a converged classifier in tests/test_zoo.py; no advice from that).
BATCH_ESTIMATES = 3
BATCH_SPREAD = 3.0
# outlier_examples: one example holds at least this share of Σ_i ‖∇ℓ_i‖² ...
OUTLIER_SHARE = 0.5
# ... in a batch of at least this many examples (in a batch of 8 random examples one held 54% of
# it by chance in tests/test_per_example.py; with 16 or more one needs a norm ~4x the others').
OUTLIER_MIN_BATCH = 16


def batch_size(block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]) -> list[Finding]:
    """The batch is BATCH_FACTOR or more below the gradient noise scale B_simple (a batch up to
    about B_simple would take proportionally fewer steps for the same examples: McCandlish et
    al. 2018) or above it (examples beyond B_simple buy little: compute spent for nothing), for
    BATCH_ESTIMATES consecutive estimates that agree within BATCH_SPREAD. Advice about speed,
    not a failure: severity info.
    """
    estimates = memory.setdefault("estimates", [])
    batches = block.scalar("gns_batch")
    noise = block.scalar("gns_simple")
    findings = []
    for step, n, b_simple in zip(block.steps, batches, noise, strict=True):
        if not (np.isfinite(n) and np.isfinite(b_simple) and b_simple > 0):
            continue
        side = (
            "below"
            if n * BATCH_FACTOR <= b_simple
            else "above"
            if n >= BATCH_FACTOR * b_simple
            else ""
        )
        if not side or (estimates and estimates[-1][2] != side):
            estimates.clear()
        if not side:
            continue
        estimates.append((int(step), float(b_simple), side, float(n)))
        if len(estimates) < BATCH_ESTIMATES:
            continue
        values = [e[1] for e in estimates[-BATCH_ESTIMATES:]]
        if max(values) > BATCH_SPREAD * min(values):
            continue
        findings.append(_batch_finding(side, float(n), estimates[0][0], int(step), values))
    return findings[-1:]


def _batch_finding(side: str, n: float, first: int, step: int, values: list[float]) -> Finding:
    """`batch_size` for a batch of `n` examples `side` ("below"/"above") the noise scale, from
    the estimates `values` that agree since step `first`."""
    level = float(np.median(values))
    message = (
        f"the batch of {n:.0f} examples is far {side} the gradient noise scale "
        f"B_simple ≈ {level:.3g} (the last {BATCH_ESTIMATES} estimates: "
        f"{min(values):.3g} to {max(values):.3g}). "
        + (
            "Below B_simple each step's gradient is mostly noise: a batch up to about "
            "B_simple would need about proportionally fewer steps for the same examples."
            if side == "below"
            else "Above B_simple the extra examples barely improve the gradient: the batch "
            "costs compute the step does not use."
        )
    )
    return Finding(
        kind="batch_size",
        layer="",
        step=first,
        last_step=step,
        severity="info",
        message=message,
        evidence={"batch": n, "b_simple": level, "estimates": values},
        remedy=(
            f"raise the batch towards {level:.3g} (scale the learning rate with it, "
            "e.g. linearly, with warm-up), or accumulate gradients over micro-batches"
            if side == "below"
            else f"lower the batch towards {level:.3g} and take more steps, or raise "
            "the learning rate"
        ),
    )


def outlier_examples(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """A single example holds OUTLIER_SHARE or more of the batch's Σ_i ‖∇ℓ_i‖² (batches of at
    least OUTLIER_MIN_BATCH): that example steers the step. Names the step and the example's
    index in the batch (its position in the order of the step's forward passes).

    A real problem when that example is corrupted or mislabelled, which its outsized gradient
    suggests; a well-fit batch with one hard example can also show it, so the message asks to
    inspect the examples rather than asserting they are wrong.
    """
    seen = memory.setdefault("seen", [])
    shares = block.scalar("pe_top_share")
    batches = block.scalar("gns_batch")
    indices = block.scalar("pe_total_argmax")
    new = False
    for step, share, n, index in zip(block.steps, shares, batches, indices, strict=True):
        if np.isfinite(share) and n >= OUTLIER_MIN_BATCH and share >= OUTLIER_SHARE:
            seen.append({"step": int(step), "index": int(index), "share": float(share)})
            new = True
    if not new:
        return []
    listed = ", ".join(
        f"example {s['index']} at step {s['step']} ({s['share']:.0%})" for s in seen[:5]
    )
    more = f" and {len(seen) - 5} more" if len(seen) > 5 else ""
    return [
        Finding(
            kind="outlier_examples",
            layer="",
            step=seen[0]["step"],
            last_step=seen[-1]["step"],
            severity="warning",
            message=(
                f"single examples dominate the batch gradient: {listed}{more} held at least "
                f"{OUTLIER_SHARE:.0%} of the batch's summed squared per-example gradient norms. "
                "Likely cause: corrupted inputs (outsized values) or wrong labels."
            ),
            evidence={"occurrences": list(seen)},
            remedy=(
                "inspect those examples (index in the step's batch, in the order of its forward "
                "passes); drop or fix corrupted ones, or clip per-example gradients"
            ),
        )
    ]
