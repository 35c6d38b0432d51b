"""Detectors of the instabilities of transformer training that arrive quietly: attention-logit
growth, output-logit divergence and Adam's ε regime (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities", arXiv 2309.14322).

Each reads probe-step statistics (`stats/attention.py`, `stats/optimizer_state.py`) and asks for
the condition on `PERSISTENT_PROBES` probe steps in a row; the finding's step is the first of
them. The thresholds were calibrated on the proxy in `tests/transformer_proxy.py` (a 2-layer
pre-norm GPT, width 32, 4 heads, on a generated second-order Markov text, AdamW, 20 warm-up
steps, cosine over 200 steps; numbers per probe step, every 10 steps):

- unstable (no qk-layernorm; the loss stays >5% above the qk-layernorm run's from step 116):
  explicit softmax at lr 0.2, max attention logit 58, 125, 234, 348, 640, 1012 at steps 20..70,
  the lowest head entropy 0.58, 0.45, 0.12, 0.07, 0.05, 0.02; SDPA alike; nn.MultiheadAttention
  542 and 0.07 at step 60; Hugging Face GPT-2 at lr 0.1, 648 and 0.05 at step 40.
- healthy and tempting (no qk-layernorm, and the loss ends *below* the qk-layernorm run's):
  explicit softmax at lr 0.1, logits up to 285, head entropy never below 0.18;
  nn.MultiheadAttention at lr 0.1, up to 180 and 0.21; GPT-2 at lr 0.08, up to 344 and 0.11.
  With qk-layernorm (lr 0.2; GPT-2 0.1): logits ≤ 8. At lr 0.01: logits ≤ 11.
The limits sit between the two: 500 (1.45x the largest healthy logit) and 0.1 nats, both at
once; the unstable runs pass both within 10 steps of passing the first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import streak
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import StatsBlock

# attention_logit_growth: the max attention logit at or above this ...
ATTN_LOGIT_LIMIT = 500.0
# ... while some head's attention entropy (mean over queries, nats) is at or below this ...
ATTN_ENTROPY_COLLAPSE = 0.1
# ... on this many probe steps in a row (all three rules).
PERSISTENT_PROBES = 2
# logit_divergence: the output logits' mean log Z at or below minus this (nats), and falling by
# at least LSE_DRIFT nats over the last LSE_WINDOW probe steps.
LSE_LIMIT = 20.0
LSE_DRIFT = 2.0
LSE_WINDOW = 3
# adam_epsilon: the share of a weight matrix's entries whose √v̂ is below 10·ε.
ADAM_EPS_SHARE = 0.5
# Probe steps of history kept (besides the first) and shown as the trend in a finding's evidence.
_TREND = 6


def attention_logit_growth(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """An attention module's max logit reaches ATTN_LOGIT_LIMIT while a head's entropy falls to
    ATTN_ENTROPY_COLLAPSE, on PERSISTENT_PROBES probe steps in a row: its attention collapses
    onto single keys, the softmax saturates and stops passing gradient, and the loss stalls or
    diverges later (Wortsman et al. 2023 §3.1; Dehghani et al. 2023)."""
    array = block.arrays.get(ATTENTION)
    if array is None or not array.data.size:
        return []
    logit, entropy = (ATTENTION_STATS.index(n) for n in ("attn_max_logit", "attn_entropy"))
    history: dict[str, list[tuple[int, float, float]]] = memory.setdefault("history", {})
    findings = []
    for c, module in enumerate(array.columns):
        for r, step in enumerate(array.steps.tolist()):
            largest, spread = (float(array.data[r, c, i]) for i in (logit, entropy))
            if not np.isfinite(largest):
                continue
            history.setdefault(module, []).append((step, largest, spread))
            del history[module][1:-_TREND]  # the first probe step and the latest ones
            holds = largest >= ATTN_LOGIT_LIMIT and spread <= ATTN_ENTROPY_COLLAPSE
            first = streak(memory, module, step, holds, PERSISTENT_PROBES)
            if first is None:
                continue
            seen = history[module]
            findings.append(
                Finding(
                    kind="attention_logit_growth",
                    layer=module,
                    step=first,
                    last_step=step,
                    severity="warning",
                    message=(
                        f"the attention logits of {module!r} grow without bound: max |q·k|/√d "
                        f"went from {seen[0][1]:.3g} (step {seen[0][0]}) to {largest:.3g} "
                        f"(step {step}) while the lowest head entropy fell from "
                        f"{seen[0][2]:.2g} to {spread:.2g} nats: the softmax has saturated onto "
                        "single keys and passes almost no gradient. The loss can look healthy "
                        "for a while; it stalls or diverges later."
                    ),
                    evidence={
                        "max_logit": largest,
                        "entropy": spread,
                        "trend": [[s, v, e] for s, v, e in seen[-_TREND:]],
                        "limits": [ATTN_LOGIT_LIMIT, ATTN_ENTROPY_COLLAPSE],
                    },
                    remedy=(
                        "normalise queries and keys (qk-layernorm: a LayerNorm on q and k per "
                        "head before q·kᵀ), or lower the learning rate / lengthen the warm-up"
                    ),
                )
            )
    return findings


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
