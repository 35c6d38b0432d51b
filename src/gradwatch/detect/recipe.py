"""Detectors of a training recipe set wrong: a learning rate far off, clipping that always acts,
probabilities fed to a loss that wants logits, inputs far from normalised, BatchNorm over too few
values.

They read probe-step statistics (`update_ratio`, `norm_values`), probe-step scalars
(`logit_prob_frac` from `stats/attention.py`, `input_rms_max`/`input_rms_min` from
`stats/inputs.py`), the guards' clip events and the every-step `global_grad_norm`. Each asks for
its condition over a stretch (probe steps in a row, or a window of recorded steps), so a warm-up,
one odd batch or the last batch of an epoch does not reach it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory, streak
from gradwatch.detect.wiring import moving
from gradwatch.stats.buffer import StatsBlock

# learning_rate: the median update-to-weight ratio ‖Δθ‖/‖θ‖ of the weight matrices per step.
# Around 1e-3 is the useful range (Karpathy's rule of thumb); at LR_HIGH each step rewrites a
# tenth of the weights, for LR_PROBES probe steps in a row ...
LR_HIGH = 0.1
LR_PROBES = 3
# An update larger than the weights (ratio at or above LR_EXTREME) needs one probe step: it has
# already rewritten them (and often killed units, after which the ratios fall).
LR_EXTREME = 1.0
# ... and at or below LR_LOW the weights do not move: from the run's first probe step, for
# LR_LOW_PROBES probe steps (a schedule decayed to its end comes after steps that moved).
LR_LOW = 1e-6
LR_LOW_PROBES = 5
# clip_always: a clip acted on at least this share of a window of CLIP_WINDOW recorded steps.
CLIP_SHARE = 0.9
CLIP_WINDOW = 50
# ... or the global norm reaching optimizer.step() sat within this relative distance of the
# window's median (clip_grad_norm_ before the step pins it at max_norm).
PINNED = 1e-4
# The guards with a fixed threshold (labels start with the class name).
FIXED_CLIPS = ("ClipNorm", "ClipValue")
# probabilities_as_logits: the share of the loss input that is probabilities, probe steps in a
# row.
PROB_SHARE = 0.99
PROB_PROBES = 3
# input_scale: the largest dense feature's RMS at or above INPUT_RMS_LIMIT, or the largest over
# the smallest at or above INPUT_SPREAD_LIMIT, on INPUT_PROBES probe steps in a row.
INPUT_RMS_LIMIT = 30.0
INPUT_SPREAD_LIMIT = 100.0
INPUT_PROBES = 2
# batchnorm_small_batch: fewer values per channel than this, on BN_PROBES probe steps in a row.
BN_MIN_VALUES = 16
BN_PROBES = 2


def _probe_scalar_rows(block: StatsBlock, name: str) -> list[tuple[int, float]]:
    values = block.scalar(name)
    return [(int(s), float(v)) for s, v in zip(block.steps, values, strict=True) if np.isfinite(v)]


def learning_rate(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The median update-to-weight ratio of the weight matrices that train is at or above
    LR_HIGH on LR_PROBES probe steps in a row, or at LR_EXTREME on one (each step rewrites the
    weights), or at or below LR_LOW on every probe step from the run's first for LR_LOW_PROBES
    (they never move).

    Judged on weight matrices with a non-negligible gradient (`wiring.moving`: a layer whose
    gradient vanished moves little whatever the learning rate, and `vanishing` names it) and a
    non-zero learning rate only, so frozen layers, parameters outside the optimizer and biases
    do not count; nor do fp16/bf16
    parameters, whose small updates round away whatever the learning rate. "Too small" is not
    judged where the weights train in fp16: there the gradient is what vanishes (`underflow`). A
    warm-up starts from steps that move the weights by more than LR_LOW unless it is far too
    small everywhere; a schedule decayed to 0 and a converged run come after steps that moved,
    so "too small" never fires then.
    """
    if "update_ratio" not in block.tensor_stats:
        return []
    ratios, norms = block.tensor_series("update_ratio"), block.tensor_series("grad_norm")
    lrs = layout.tensor_lr or (1.0,) * len(layout.tensors)
    weights = [t for t in layout.weight_tensors() if lrs[t] and layout.updates_representable(t)]
    if not weights:
        return []
    findings = []
    for r in np.flatnonzero(np.isfinite(ratios[:, weights]).any(axis=1)):
        step = int(block.steps[r])
        live = moving(norms[r])
        kept = [t for t in weights if np.isfinite(ratios[r, t]) and live[t]]
        if not kept:
            continue
        median = float(np.median(ratios[r, kept]))
        memory.setdefault("trend", []).append((step, median))
        del memory["trend"][1:-6]
        needed = 1 if median >= LR_EXTREME else LR_PROBES
        first = streak(memory, "high", step, median >= LR_HIGH, needed)
        if first is not None:
            findings.append(_lr_finding(layout, kept, ratios[r], first, step, memory, high=True))
        # In fp16 tiny updates follow from gradients lost to underflow (`underflow` says so).
        fp16 = any(layout.precision(t) == "float16" for t in kept)
        memory["moved"] = memory.get("moved", False) or median > LR_LOW or fp16
        memory["probes"] = memory.get("probes", 0) + 1
        if not memory["moved"] and memory["probes"] >= LR_LOW_PROBES:
            start = memory["trend"][0][0]
            findings.append(_lr_finding(layout, kept, ratios[r], start, step, memory, high=False))
    return findings[-1:]


def _lr_finding(
    layout: ModelLayout,
    weights: list[int],
    ratios: np.ndarray,
    first: int,
    step: int,
    memory: Memory,
    high: bool,
) -> Finding:
    median = memory["trend"][-1][1]
    if high:
        what = (
            f"each update changes the weight matrices by {median:.2g} of their norm (median "
            f"update-to-weight ratio at step {step}; useful training moves "
            "them by about 1e-3 per step): every step rewrites the weights, so training cannot "
            "settle. Likely cause: a learning rate 10-100x too large for this optimizer and model"
        )
        remedy = (
            "lower the learning rate until the median update ratio is near 1e-3 "
            "(run.series('update_ratio')); add warm-up; Adam-family optimizers usually train at "
            "1e-4 to 3e-3, SGD at 1e-3 to 1e-1"
        )
    else:
        what = (
            f"the weight matrices move by at most {LR_LOW:.0e} of their norm per step (median "
            f"update-to-weight ratio {median:.1e}) on every probe step since the run began: they "
            "practically do not learn. Likely cause: a learning rate orders of magnitude too "
            "small (a typo in the exponent, or a scheduler factor that starts and stays near 0)"
        )
        remedy = (
            "raise the learning rate until the median update ratio is near 1e-3 "
            "(run.series('update_ratio')); check the scheduler's factor at these steps"
        )
    largest = max(weights, key=lambda t: ratios[t])
    return Finding(
        kind="learning_rate",
        layer="",
        step=first,
        last_step=step,
        severity="error" if high else "warning",
        message=what + ".",
        evidence={
            "median_update_ratio": median,
            "direction": "too_large" if high else "too_small",
            "trend": [list(t) for t in memory["trend"]],
            "largest": {layout.tensors[largest]: float(ratios[largest])},
        },
        remedy=remedy,
    )


def clip_always(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """Gradient clipping that acts on at least CLIP_SHARE of CLIP_WINDOW recorded steps in a row:
    a gradwatch norm or value clip whose events say so, or the user's own `clip_grad_norm_`,
    seen as a global norm at `optimizer.step()` pinned within PINNED of one value.

    A real problem: a threshold below the typical gradient norm rescales every update, which
    lowers the learning rate silently and throws away the norm's information. Only fixed
    thresholds are judged (FIXED_CLIPS and the user's own): ZClip acts on outliers, AutoClip
    clips above a percentile of past norms by design (most steps at its default 10th), AGC clips
    units, not the step. A threshold that only catches spikes stays silent.
    """
    clipped_at = {
        e.step: e.detail
        for e in block.events
        if e.kind == "clip" and e.guard.startswith(FIXED_CLIPS) and "clipped_to" in e.detail
    }
    norms = block.scalar("global_grad_norm")
    window: deque[tuple[int, float, bool, float]] = memory.setdefault(
        "window", deque(maxlen=CLIP_WINDOW)
    )
    findings = []
    for step, norm in zip(block.steps.tolist(), norms.tolist(), strict=True):
        if not np.isfinite(norm):
            continue
        detail = clipped_at.get(step)
        window.append((step, norm, detail is not None, detail["clipped_to"] if detail else norm))
        if len(window) < CLIP_WINDOW or memory.get("found"):
            continue
        values = np.array([w[1] for w in window])
        guard_share = float(np.mean([w[2] for w in window]))
        level = float(np.median(values))
        pinned = float(np.mean(np.abs(values / level - 1) <= PINNED)) if level > 0 else 0.0
        if guard_share >= CLIP_SHARE:
            to = float(np.median([w[3] for w in window]))
            findings.append(_clip_finding(window, guard_share, level, to, by_guard=True))
        elif pinned >= CLIP_SHARE:
            findings.append(_clip_finding(window, pinned, level, level, by_guard=False))
        memory["found"] = bool(findings)
    return findings


def _clip_finding(
    window: deque[tuple[int, float, bool, float]], share: float, level: float, to: float,
    by_guard: bool,
) -> Finding:  # fmt: skip
    first, last = window[0][0], window[-1][0]
    if by_guard:
        what = (
            f"a gradwatch clip guard clipped {share:.0%} of the last {len(window)} recorded steps "
            f"(steps {first}-{last}): the median gradient norm before clipping was {level:.3g}, "
            f"clipped to {to:.3g}, so every update is scaled down by about {level / to:.2g}x"
        )
    else:
        what = (
            f"the global gradient norm reaching optimizer.step() was {level:.4g} on {share:.0%} "
            f"of the last {len(window)} recorded steps (steps {first}-{last}): the gradients are "
            f"clipped (clip_grad_norm_ with max_norm ≈ {level:.3g}) before the step, and the clip "
            "acts on nearly every step"
        )
    return Finding(
        kind="clip_always",
        layer="",
        step=first,
        last_step=last,
        severity="warning",
        message=what + ": the threshold is below the typical gradient norm, so clipping silently "
        "lowers the learning rate and discards the gradient norm instead of catching outliers.",
        evidence={"clipped_share": share, "norm_median": level, "clipped_to": to},
        remedy=(
            "raise the clipping threshold above the typical gradient norm (about its 90th "
            "percentile: run.series('global_grad_norm') of a run without clipping), or clip "
            "adaptively with gw.guards.ZClip(), which acts on outliers only"
        ),
    )


def probabilities_as_logits(
    block: StatsBlock, layout: ModelLayout, memory: Memory
) -> list[Finding]:
    """The input of `F.cross_entropy` (rows that are distributions) or of
    `F.binary_cross_entropy_with_logits` (entries inside (0, 1)) is already probabilities:
    `logit_prob_frac` at or above PROB_SHARE on PROB_PROBES probe steps in a row.

    A real problem: the loss applies its own softmax/sigmoid again, so it cannot go below a floor
    (cross-entropy of a softmax over values in [0, 1] stays above log C − 1) and its gradient is
    squashed by the first one. Logits are never all in [0, 1] with rows summing to 1, so a healthy
    run reads 0; label smoothing changes the target, not the input, and a sigmoid output trained
    with `binary_cross_entropy` (not `_with_logits`) is not read.
    """
    findings = []
    for step, share in _probe_scalar_rows(block, "logit_prob_frac"):
        first = streak(memory, "prob", step, share >= PROB_SHARE, PROB_PROBES)
        if first is None:
            continue
        squash = [
            m for m, kind in zip(layout.modules, layout.module_types, strict=True)
            if kind in ("Softmax", "Sigmoid", "Softmax2d")
        ]  # fmt: skip
        findings = [
            Finding(
                kind="probabilities_as_logits",
                layer=squash[-1] if squash else "",
                step=first,
                last_step=step,
                severity="error",
                message=(
                    f"{share:.0%} of what goes into the loss is already probabilities (rows in "
                    "[0, 1] summing to 1 for cross_entropy, values inside (0, 1) for "
                    f"binary_cross_entropy_with_logits), {PROB_PROBES}+ probe steps in a row: "
                    "the loss applies softmax/sigmoid a second time, so it cannot fall below a "
                    "floor and its gradient is squashed. Likely cause: a softmax or sigmoid at "
                    "the end of the model"
                    + (f" ({squash[-1]!r})" if squash else "")
                    + " before a loss that expects logits."
                ),
                evidence={"prob_share": share},
                remedy=(
                    "return raw logits from the model and let the loss apply the softmax/sigmoid "
                    "(F.cross_entropy, F.binary_cross_entropy_with_logits); apply softmax/sigmoid "
                    "only at inference"
                ),
            )
        ]
    return findings


def input_scale(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """The model's dense input features are far from normalised: the largest feature's RMS is
    at or above INPUT_RMS_LIMIT, or the largest is INPUT_SPREAD_LIMIT times the smallest, on
    INPUT_PROBES probe steps in a row (`stats/inputs.py`).

    A real problem: the first layer's weight gradient scales with each feature, so the largest
    features dominate it and the learning rate suits no feature. Standardised inputs, images in
    [0, 1], one-hot and bag-of-words columns (sparse, not counted) and token ids stay silent.
    """
    largest = dict(_probe_scalar_rows(block, "input_rms_max"))
    smallest = dict(_probe_scalar_rows(block, "input_rms_min"))
    findings = []
    for step, high in largest.items():
        low = smallest.get(step, float("nan"))
        spread = high / low if np.isfinite(low) and low > 0 else 1.0
        holds = high >= INPUT_RMS_LIMIT or spread >= INPUT_SPREAD_LIMIT
        first = streak(memory, "input", step, holds, INPUT_PROBES)
        if first is None:
            continue
        columns = layout.layer_columns()
        layer = layout.modules[columns[0]] if columns else ""
        what = (
            f"the largest input feature has an RMS of {high:.3g}"
            if high >= INPUT_RMS_LIMIT
            else f"the input features' RMS ranges from {low:.3g} to {high:.3g} ({spread:.0f}x)"
        )
        findings = [
            Finding(
                kind="input_scale",
                layer=layer,
                step=first,
                last_step=step,
                severity="warning",
                message=(
                    f"{what} ({INPUT_PROBES}+ probe steps in a row; normalised inputs have "
                    f"about 1): the gradient of the first layer{f' {layer!r}' if layer else ''} "
                    "scales with each feature, so the largest ones dominate it and no single "
                    "learning rate suits all features. Likely cause: inputs not normalised "
                    "(raw pixel values, physical units, counts)."
                ),
                evidence={"input_rms_max": high, "input_rms_min": low, "spread": spread},
                remedy=(
                    "standardise each input feature ((x − mean) / std over the training set), "
                    "scale images to [0, 1] (or normalise per channel), log-transform heavy-"
                    "tailed counts"
                ),
            )
        ]
    return findings


def batchnorm_small_batch(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """A BatchNorm layer in training mode computes its statistics from fewer than BN_MIN_VALUES
    values per channel (batch x spatial positions, `norm_values`) on BN_PROBES probe steps in a
    row.

    A real problem: with n values a normalised output is bounded by √(n − 1) (±1 for n = 2), so
    the layer's output is pinned by its own batch and the gradient through it is mostly noise.
    BatchNorm in eval mode, and a small last batch of an epoch (one probe step), stay silent.
    """
    if "norm_values" not in block.module_stats:
        return []
    values = block.module_series("norm_values")
    found: dict[int, tuple[int, int, float]] = {}
    for r, step in enumerate(block.steps.tolist()):
        for c in np.flatnonzero(np.isfinite(values[r])):
            first = streak(memory, int(c), step, bool(values[r, c] < BN_MIN_VALUES), BN_PROBES)
            if first is not None:
                found[int(c)] = (first, step, float(values[r, c]))
    return [
        Finding(
            kind="batchnorm_small_batch",
            layer=layout.modules[c],
            step=first,
            last_step=last,
            severity="warning",
            message=(
                f"{layout.modules[c]!r} ({layout.module_types[c]}) normalises each channel over "
                f"only {count:.0f} values (batch x spatial positions) in training mode, "
                f"{BN_PROBES}+ probe steps in a row: its outputs are bounded by "
                f"±{max(count - 1, 1) ** 0.5:.2g}, set by the few values in the batch, and the "
                "gradient through it is mostly noise. Likely cause: a batch too small for "
                "BatchNorm (per device, under data parallelism)."
            ),
            evidence={"values_per_channel": count},
            remedy=(
                "use a larger batch (at least 16-32 values per channel), replace BatchNorm by "
                "GroupNorm or LayerNorm (independent of the batch), or use SyncBatchNorm across "
                "devices"
            ),
        )
        for c, (first, last, count) in found.items()
    ]
