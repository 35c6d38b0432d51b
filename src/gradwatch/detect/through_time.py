"""Detectors for recurrent modules: the gradient vanishing or exploding through time.

They read the per-module summary `time_first_to_last`, `time_decay` and `time_reach` (see
`stats/through_time.py`), recorded on probe steps for `nn.RNN`/`nn.LSTM`/`nn.GRU` and the cells,
and judge each module on the block's median, so one odd batch does not tempt them. They raise the
kinds `vanishing` and `exploding` with "through time" in the message, naming the recurrent module.

Calibration (tests/test_through_time.py, hidden 64, default init, a many-to-one task whose answer
sits in the first time step): at T = 100 the first step gets 0 to 1e-18 of the last step's
gradient (RNN, LSTM, GRU alike) and nothing learns; at T = 30 about 1e-7 to 1e-6; at T = 5 0.1 to
4x and the task is learnt. A tanh RNN whose recurrent matrix is 2x an orthogonal one grows the
gradient about 800x over 30 steps back in time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.stats.buffer import StatsBlock

# log10 of (gradient reaching the first time step / at the last): vanishing at or below
# −TIME_ORDERS, exploding at or above +TIME_ORDERS; an error from twice that.
TIME_ORDERS = 3.0
# vanishing: below the limit on this many probe steps in a row, while training does not
# overcome it: an untrained recurrent net forgets fast (a healthy LSTM reading digits row by
# row starts at 4e-6 and passes 1e-3 by step 40 as it learns). Overcoming = the ratio covered
# at least OVERCOME_SHARE of the distance to the limit, in orders of magnitude, over those steps.
TIME_PATIENCE = 4
OVERCOME_SHARE = 0.5


def vanishing_through_time(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """The gradient reaching a recurrent module's first time step is TIME_ORDERS orders below
    what reaches its last one (block median): dependencies longer than `time_reach` steps cannot
    be learnt.

    It must hold on TIME_PATIENCE probe steps in a row while the ratio does not rise towards
    the limit (`OVERCOME_SHARE`): an untrained recurrent net forgets fast, and training often
    overcomes it. Quiet where the gradient reaches the first steps, and for
    sequence-to-sequence losses, where every step gets a gradient of its own (the first-to-last
    ratio stays near 1). A model that has learnt to ignore old inputs also shows a small ratio:
    the message states what reaches how far back, which is true in both cases.
    """
    persisting = _persisting(block, memory)
    findings = []
    for column, ratio, decay, reach, _ in _measured(block, layout):
        if column not in persisting:
            continue
        step = persisting[column]
        name, kind = layout.modules[column], layout.module_types[column]
        findings.append(
            Finding(
                kind="vanishing",
                layer=name,
                step=step,
                last_step=int(block.steps[-1]),
                severity="error" if ratio <= 10 ** (-2 * TIME_ORDERS) else "warning",
                message=(
                    f"the gradient vanishes through time in {name!r} ({kind}): backpropagated "
                    f"over its input sequence it shrinks by {decay:.2g}x per time step, "
                    f"{_first_step(ratio)}, and it "
                    f"stays above 1/1000 for only {reach:.0f} steps back{_length(block, name)}: "
                    f"dependencies longer than that are not learnt. Likely cause: "
                    + _vanishing_cause(kind)
                ),
                evidence={
                    "through_time": True,
                    "first_to_last": ratio,
                    "decay_per_step": decay,
                    "reach_steps": reach,
                },
                remedy=_vanishing_remedy(kind),
            )
        )
    return findings


def exploding_through_time(
    block: StatsBlock, layout: ModelLayout, memory: dict[str, Any]
) -> list[Finding]:
    """The gradient reaching a recurrent module's first time step is TIME_ORDERS orders above
    what reaches its last one (block median): the recurrence multiplies it at every step back."""
    findings = []
    for column, ratio, decay, _, step in _measured(block, layout):
        if not ratio >= 10**TIME_ORDERS:
            continue
        name, kind = layout.modules[column], layout.module_types[column]
        findings.append(
            Finding(
                kind="exploding",
                layer=name,
                step=step,
                last_step=int(block.steps[-1]),
                severity="error",
                message=(
                    f"the gradient explodes through time in {name!r} ({kind}): backpropagated "
                    f"over its input sequence it grows by {decay:.3g}x per time step back, and "
                    f"what reaches the first step is {ratio:.1e} times what reaches the last"
                    f"{_length(block, name)}. Likely cause: recurrent weights whose largest "
                    "singular value is above 1, so each step back multiplies the gradient."
                ),
                evidence={"through_time": True, "first_to_last": ratio, "growth_per_step": decay},
                remedy=(
                    "clip gradients (gw.guards.ClipNorm(1.0) or gw.guards.ZClip()), initialise "
                    "the recurrent weights orthogonally (nn.init.orthogonal_ on weight_hh), "
                    "lower the learning rate, or backpropagate through fewer steps (truncated "
                    "BPTT)"
                ),
            )
        )
    return findings


def _persisting(block: StatsBlock, memory: dict[str, Any]) -> dict[int, int]:
    """Module columns whose first-to-last ratio stayed at or below 10^−TIME_ORDERS on the last
    TIME_PATIENCE probe steps without being overcome, with the first step of that stretch."""
    if "time_first_to_last" not in block.module_stats:
        return {}
    ratios = block.module_series("time_first_to_last")
    # per column: the step the stretch began at, and its last TIME_PATIENCE ratios
    stretches: dict[int, tuple[int, list[float]]] = memory.setdefault("stretches", {})
    found = {}
    for r, step in enumerate(block.steps.tolist()):
        for column in np.flatnonzero(np.isfinite(ratios[r])).tolist():
            ratio = float(ratios[r, column])
            if ratio > 10**-TIME_ORDERS:
                stretches.pop(column, None)
                continue
            began, recent = stretches.setdefault(column, (step, []))
            recent.append(ratio)
            del recent[:-TIME_PATIENCE]
            if len(recent) == TIME_PATIENCE and not _overcoming(recent[0], ratio):
                found.setdefault(column, began)
    return found


def _overcoming(first: float, last: float) -> bool:
    """Whether the ratio rose from `first` to `last` by OVERCOME_SHARE of the orders of
    magnitude between `first` and the limit (0 counts as the smallest float32 subnormal)."""
    start, end = np.log10(max(first, 1e-45)), np.log10(max(last, 1e-45))
    return end - start >= OVERCOME_SHARE * (-TIME_ORDERS - start)


def _measured(block: StatsBlock, layout: ModelLayout) -> list[tuple[int, float, float, float, int]]:
    """Per recurrent module measured in the block: (column, median first-to-last ratio, median
    decay per step, median reach, first step measured)."""
    if "time_first_to_last" not in block.module_stats:
        return []
    ratios = block.module_series("time_first_to_last")
    decays = block.module_series("time_decay")
    reaches = block.module_series("time_reach")
    measured = []
    for column in range(len(layout.modules)):
        rows = np.flatnonzero(np.isfinite(ratios[:, column]))
        if not rows.size:
            continue
        measured.append(
            (
                column,
                float(np.median(ratios[rows, column])),
                _median(decays[rows, column]),
                float(np.median(reaches[rows, column])),
                int(block.steps[rows[0]]),
            )
        )
    return measured


def _first_step(ratio: float) -> str:
    if ratio > 0:
        return f"what reaches the first step is {ratio:.1e} of what reaches the last"
    return "nothing reaches the first step (the gradient underflows to 0)"


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _length(block: StatsBlock, name: str) -> str:
    """ ", of its N time steps" from the block's latest profile of module `name`, if stored."""
    profiles = block.arrays.get("grad_through_time")
    if profiles is None or name not in profiles.columns:
        return ""
    latest = profiles.data[-1, profiles.columns.index(name)]
    return f" of the sequence's {int(np.isfinite(latest).sum())} time steps"


def _vanishing_cause(kind: str) -> str:
    if kind in ("RNN", "RNNCell"):
        return (
            "a plain RNN multiplies the gradient by its recurrent Jacobian (W_hh times tanh', "
            "below 1 in norm at default init) at every step back."
        )
    if kind in ("LSTM", "LSTMCell"):
        return (
            "the forget gate (bias 0 at default init, so about half of the cell state is kept "
            "per step) lets the memory of early steps decay over long sequences."
        )
    if kind in ("GRU", "GRUCell"):
        return (
            "the update gate (bias 0 at default init) mixes about half of the new state in at "
            "every step, so the memory of early steps decays over long sequences."
        )
    return "the recurrence shrinks the gradient at every step back."


def _vanishing_remedy(kind: str) -> str:
    gated = (
        "use a gated cell (nn.LSTM or nn.GRU) instead of a plain RNN"
        if kind in ("RNN", "RNNCell")
        else (
            "initialise the forget-gate bias to 1 (the second quarter of bias_ih_l*/bias_hh_l*)"
            if kind.startswith("LSTM")
            else "bias the update gate towards keeping the state (a positive second third of "
            "bias_hh_l*)"
        )
    )
    return (
        f"{gated}; shorten the sequences or backpropagate through fewer steps (truncated BPTT); "
        "add skip or attention connections over time (or use a transformer) for long-range "
        "dependencies; initialise the recurrent weights orthogonally (nn.init.orthogonal_), or "
        "as the identity with ReLU (IRNN)"
    )
