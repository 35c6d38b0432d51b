"""Detectors of the instabilities of transformer training that arrive quietly: attention-logit
growth, output-logit divergence and Adam's ε regime (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities", arXiv 2309.14322).

Each reads probe-step statistics (`stats/attention.py`, `stats/optimizer_state.py`). The level
conditions must hold on `PERSISTENT_PROBES` probe steps in a row; the finding's step is the first
of them. The thresholds were calibrated on the proxies of `tests/transformer_proxy.py` (four
small pre-norm GPTs on generated tasks, each with its qk-layernorm twin; probes every 10 steps);
docs/early-warning.md has the tables, measured on 2 CPU threads:

- unstable (no qk-layernorm; the loss stays >5% above the twin's): the max attention logit
  grows 2-3x every 10 steps and keeps that pace after the heads have turned sharp, e.g. 25, 74,
  161, 218 at steps 40-70 with the lowest head entropy 0.81, 0.33, 0.22, 0.12 (copy proxy).
- healthy and tempting (no qk-layernorm at lr 0.1 / GPT-2 at 0.08, loss at or below the twin's):
  the same fast growth early on, then it levels off once a head is sharp: 51, 97, 154, 147, 194
  at steps 20-60 with entropy 0.63, 0.47, 0.33, 0.25, 0.13; largest logits 186-415, entropies
  down to 0.03. With qk-layernorm: logits ≤ 20. At lr 0.01: ≤ 51.
The trend (two intervals of ≥ 1.8x per 10 steps ending at ≥ 50 with entropy ≤ 0.3) sits between
the two: healthy runs grow that fast only while their heads are still soft. The level (500 and
0.1 nats at once, 1.2x the largest healthy logit) names what the trend misses.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import streak
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import StatsBlock

# attention_logit_growth fires on either of two conditions. The level: the max attention logit
# at or above this ...
ATTN_LOGIT_LIMIT = 500.0
# ... while some head's attention entropy (mean over queries, nats) is at or below this ...
ATTN_ENTROPY_COLLAPSE = 0.1
# ... on this many probe steps in a row (all three rules).
PERSISTENT_PROBES = 2
# The trend: the max logit grew at least LOGIT_GROWTH-fold per GROWTH_STEPS steps on every probe
# interval of the last TREND_STEPS steps (probe points closer than GROWTH_STEPS are skipped) ...
LOGIT_GROWTH = 1.8
GROWTH_STEPS = 10
TREND_STEPS = 20
# ... and now stands at TREND_LOGIT or more while the lowest head entropy is at most TREND_ENTROPY.
TREND_LOGIT = 50.0
TREND_ENTROPY = 0.3
# logit_divergence: the output logits' mean log Z at or below minus this (nats), and falling by
# at least LSE_DRIFT nats over the last LSE_WINDOW probe steps.
LSE_LIMIT = 20.0
LSE_DRIFT = 2.0
LSE_WINDOW = 3
# adam_epsilon: the share of a weight matrix's entries whose √v̂ is below 10·ε.
ADAM_EPS_SHARE = 0.5
# Probe steps of history kept (besides the first) and shown as the trend in a finding's evidence.
_TREND = 6
# Points of the max-logit history kept for the trend (besides the first).
_GROWTH_POINTS = TREND_STEPS // GROWTH_STEPS + 4


def attention_logit_growth(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """An attention module's max logit runs away: it grew LOGIT_GROWTH-fold or more every
    GROWTH_STEPS steps for TREND_STEPS steps while a head's entropy fell (the trend), or it has
    reached ATTN_LOGIT_LIMIT with a head's entropy at ATTN_ENTROPY_COLLAPSE on
    PERSISTENT_PROBES probe steps in a row (the level). The attention then collapses onto single
    keys, the softmax saturates and stops passing gradient, and the loss stalls or diverges later
    (Wortsman et al. 2023 §3.1; Dehghani et al. 2023).

    Healthy runs also grow their logits, fast at first, and then level off (at 100-450 on the
    tempting runs of `tests/transformer_proxy.py`); the runaway keeps its pace. The calibration
    and what it does and does not reach are in docs/early-warning.md."""
    array = block.arrays.get(ATTENTION)
    if array is None or not array.data.size:
        return []
    logit, entropy = (ATTENTION_STATS.index(n) for n in ("attn_max_logit", "attn_entropy"))
    points: dict[str, list[tuple[int, float, float]]] = memory.setdefault("points", {})
    findings = []
    for c, module in enumerate(array.columns):
        for r, step in enumerate(array.steps.tolist()):
            largest, spread = (float(array.data[r, c, i]) for i in (logit, entropy))
            if not np.isfinite(largest):
                continue
            seen = points.setdefault(module, [])
            if not seen or step - seen[-1][0] >= GROWTH_STEPS:
                seen.append((step, largest, spread))
                del seen[1:-_GROWTH_POINTS]  # the first probe step and the latest ones
            level = largest >= ATTN_LOGIT_LIMIT and spread <= ATTN_ENTROPY_COLLAPSE
            first = streak(memory, module, step, level, PERSISTENT_PROBES)
            trend = seen[-1][0] == step and _runaway(seen)
            if first is None and not trend:
                continue
            findings.append(
                _logit_growth_finding(
                    module,
                    seen,
                    (step, largest, spread),
                    first if first is not None else step,
                    trend,
                )
            )
    return findings


def _runaway(seen: list[tuple[int, float, float]]) -> bool:
    """The trend of `attention_logit_growth` holds at the latest of `seen` ((step, max logit,
    lowest head entropy), ascending)."""
    step, largest, spread = seen[-1]
    if largest < TREND_LOGIT or spread > TREND_ENTROPY:
        return False
    start = [i for i, point in enumerate(seen) if point[0] <= step - TREND_STEPS]
    if not start:
        return False
    window = seen[start[-1] :]
    return all(
        a[1] > 0 and b[1] >= a[1] * LOGIT_GROWTH ** ((b[0] - a[0]) / GROWTH_STEPS)
        for a, b in itertools.pairwise(window)
    )


def _logit_growth_finding(
    module: str,
    seen: list[tuple[int, float, float]],
    now: tuple[int, float, float],
    first: int,
    trend: bool,
) -> Finding:
    """The finding of `attention_logit_growth` at `now` (step, max logit, lowest entropy), from
    the history `seen`; `first` is the step it names."""
    (start, begun, spread_then), (step, largest, spread) = seen[0], now
    if trend:
        back = [p for p in seen if p[0] <= step - TREND_STEPS][-1]
        pace = (
            f"grew {largest / back[1]:.3g}-fold in the last {step - back[0]} steps (at least "
            f"{LOGIT_GROWTH:g}x every {GROWTH_STEPS} steps, from {back[1]:.3g} at step {back[0]} "
            f"to {largest:.3g} at step {step}) and shows no sign of levelling off"
        )
    else:
        pace = f"went from {begun:.3g} (step {start}) to {largest:.3g} (step {step})"
    return Finding(
        kind="attention_logit_growth",
        layer=module,
        step=first,
        last_step=step,
        severity="warning",
        message=(
            f"the attention logits of {module!r} grow without bound: max |q·k|/√d {pace}, "
            f"while the lowest head entropy fell from {spread_then:.2g} to {spread:.2g} nats. "
            "The softmax is saturating onto single keys, where it passes almost no gradient. "
            "The loss can look healthy for a while; it stalls or diverges later."
        ),
        evidence={
            "max_logit": largest,
            "entropy": spread,
            "trend": [[s, v, e] for s, v, e in seen[-_TREND:]],
            "limits": [ATTN_LOGIT_LIMIT, ATTN_ENTROPY_COLLAPSE],
            "growth": [LOGIT_GROWTH, GROWTH_STEPS, TREND_STEPS],
            "rule": "trend" if trend else "level",
        },
        remedy=(
            "normalise queries and keys (qk-layernorm: a LayerNorm on q and k per head before "
            "q·kᵀ), or lower the learning rate / lengthen the warm-up"
        ),
    )


def logit_divergence(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """The output logits' mean log Z is at or below −LSE_LIMIT and fell by LSE_DRIFT more over
    the last LSE_WINDOW probe steps, on PERSISTENT_PROBES probe steps in a row: the logits drift
    as a whole (softmax does not see a shift common to all logits, so nothing in the loss holds
    them), until precision runs out and the loss diverges (Wortsman et al. 2023 §3.2; the z-loss
    of PaLM, Chowdhery et al. 2022).

    Only the drift below 0 is named: log Z ≥ the largest logit, so log Z ≪ 0 means every logit
    is far below 0, a drift of them all; log Z ≫ 0 is also what a confident classifier shows
    (log Z ≈ its top logit), as a healthy classifier on inputs scaled up 8x does in `test_zoo`.
    """
    lse = block.scalar("logit_lse")
    history: list[tuple[int, float]] = memory.setdefault("history", [])
    findings = []
    for step, value in zip(block.steps.tolist(), lse.tolist(), strict=True):
        if not np.isfinite(value):
            continue
        history.append((step, value))
        del history[1:-_TREND]  # the first probe step and the latest ones
        earlier = history[-1 - LSE_WINDOW][1] if len(history) > LSE_WINDOW else np.nan
        falling = earlier - value >= LSE_DRIFT
        first = streak(memory, "", step, value <= -LSE_LIMIT and falling, PERSISTENT_PROBES)
        if first is None:
            continue
        findings.append(
            Finding(
                kind="logit_divergence",
                layer="",
                step=first,
                last_step=step,
                severity="warning",
                message=(
                    f"the output logits drift: their mean log Z (logsumexp over classes) went "
                    f"from {history[0][1]:.3g} (step {history[0][0]}) to {value:.3g} (step "
                    f"{step}) and keeps falling: every logit is below −{LSE_LIMIT:g}. The "
                    "softmax ignores a shift common to all logits, so nothing in the loss stops "
                    "the drift; large logits lose precision and the loss diverges later."
                ),
                evidence={"logit_lse": value, "trend": [list(h) for h in history[-_TREND:]]},
                remedy=(
                    "add the z-loss (1e-4 · log²Z, the mean over positions of the squared "
                    "logsumexp of the logits) to the loss, or use weight decay on the output "
                    "layer"
                ),
            )
        )
    return findings


def adam_epsilon(block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]) -> list[Finding]:
    """ADAM_EPS_SHARE or more of a weight matrix's entries have √v̂ below 10·ε, on
    PERSISTENT_PROBES probe steps in a row: Adam's ε dominates the denominator and the layer's
    updates shrink (Wortsman et al. 2023 §3.4). Embedding tables (rows of tokens not seen lately
    have v → 0 whatever ε is), vectors (a key bias gets no gradient at all: softmax ignores
    it) and entries that dead ReLU units around the layer explain (`dead_units` says that) are
    left out."""
    shares = block.tensor_series("adam_eps_frac")
    dead = block.module_series("dead_frac")
    candidates = [
        t
        for t in range(len(layout.tensors))
        if layout.tensor_ranks
        and layout.tensor_ranks[t] >= 2
        and layout.module_type(layout.tensor_modules[t]) != "Embedding"
    ]
    zeroing = {t: layout.zeroing_around(layout.tensor_modules[t]) for t in candidates}
    found: dict[int, tuple[int, float]] = {}
    for r, step in enumerate(block.steps.tolist()):
        row = shares[r]
        if not np.isfinite(row).any():
            continue
        for t in candidates:
            live = np.prod([1 - np.nan_to_num(dead[r, c]) for c in zeroing[t]])
            holds = bool(row[t] >= ADAM_EPS_SHARE) and live > 1 - ADAM_EPS_SHARE
            first = streak(memory, t, step, holds, PERSISTENT_PROBES)
            if first is not None:
                found[t] = (found.get(t, (first, 0.0))[0], float(row[t]))
    if not found:
        return []
    tensors = sorted(found)
    names = [layout.tensors[t] for t in tensors]
    shown = ", ".join(repr(n) for n in names[:4]) + (
        f" and {len(names) - 4} more" if len(names) > 4 else ""
    )
    share = max(s for _, s in found.values())
    return [
        Finding(
            kind="adam_epsilon",
            layer="",
            step=min(first for first, _ in found.values()),
            last_step=int(block.steps[-1]),
            severity="warning",
            message=(
                f"Adam's ε dominates the update of {shown}: up to {share:.0%} of their entries "
                f"have a gradient RMS (√v̂) below 10·ε, so their updates shrink far below the "
                "learning rate and these layers learn slowly or not at all."
            ),
            evidence={"tensors": names, "shares": [found[t][1] for t in tensors]},
            remedy=(
                "lower the optimizer's eps (e.g. 1e-15 instead of 1e-8; Wortsman et al. 2023), "
                "or scale the loss up so that the gradients are well above ε"
            ),
        )
    ]
