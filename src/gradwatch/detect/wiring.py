"""Detectors of training code wired wrong: gradients never cleared, parameters the loss never
reaches, parameters the optimizer never moves (units that start identical and stay so:
`symmetry.py`).

Each reads per-tensor statistics (`stats/grads.py`): `grad_none`, `grad_norm`, `stale_norm`,
`update_ratio`, `param_norm`, `row_spread`. Each condition is exact, not a matter of degree: a
healthy loop has 0 carried-over gradient, some gradient in every trainable tensor, a non-zero
update wherever there is a gradient and a learning rate, and distinct units after random init.
So the thresholds below only absorb rounding, and the streaks absorb one odd step.
"""

from __future__ import annotations

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.streaks import Memory, streak
from gradwatch.stats.buffer import StatsBlock

# stale_gradients: a tensor's carried-over gradient is at least this share of its step gradient ...
STALE_SHARE = 0.5
# ... on this many probe steps in a row (a missing zero_grad reads ~(t−1)/t at step t).
STALE_PROBES = 2
# no_gradient: recorded steps without any non-zero gradient in a tensor before it is named (an
# auxiliary head used on some steps only gets one within them).
NO_GRADIENT_STEPS = 50
# not_updated / symmetric_weights: probe steps in a row.
PERSISTENT_PROBES = 3
# no_gradient: a ReLU with this share of dead units explains all-zero gradients around it.
DEAD_UNITS_ALL = 0.99
# not_updated, learning_rate: a gradient below this share of the step's largest tensor gradient
# is negligible: its update may round away in float32, θ unchanged (a bias before BatchNorm gets
# ~1e-9; the early layers of a net whose gradient vanishes, 1e-20 to 1e-11 of the last layer's).
NEGLIGIBLE_GRAD = 1e-4


def moving(norms: np.ndarray) -> np.ndarray:
    """Which of a probe step's tensor gradient norms are large enough for their update to show:
    finite and at least NEGLIGIBLE_GRAD of the largest."""
    finite = np.isfinite(norms)
    largest = np.max(norms[finite], initial=0.0)
    return finite & (norms > 0) & (norms >= NEGLIGIBLE_GRAD * largest)


def _listed(layout: ModelLayout, tensors: list[int], limit: int = 5) -> str:
    shown = ", ".join(repr(layout.tensors[t]) for t in tensors[:limit])
    return shown + (f" and {len(tensors) - limit} more" if len(tensors) > limit else "")


def probe_rows(block: StatsBlock) -> np.ndarray:
    """Rows of the block's probe steps (those with a non-finite count recorded)."""
    return np.flatnonzero(np.isfinite(block.tensor_series("grad_nonfinite")).any(axis=1))


def _skipped_steps(block: StatsBlock) -> set[int]:
    return {e.step for e in block.events if e.kind in ("skip", "rollback")}


def stale_gradients(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """Gradients carried over from earlier optimizer steps: at STALE_PROBES probe steps in a row,
    STALE_SHARE or more of a tensor's gradient was already in `.grad` before the step's first
    backward (`stale_norm`, see `stats/stale.py`).

    A real problem: `optimizer.zero_grad()` is missing (or clears only part of the model), so
    every update follows the sum of all past gradients. Silent for gradient accumulation (the
    gradient is cleared once per optimizer step, then summed over micro-batches), for
    `zero_grad(set_to_none=False)`, and for a GAN whose generator backward also reaches the
    discriminator before the discriminator clears its gradients. Tensors in none of the
    optimizer's groups are left out: `optimizer.zero_grad()` does not clear them, but the
    optimizer does not apply them either (that is `not_updated`).
    """
    if "stale_norm" not in block.tensor_stats:
        return []
    stale, norms = block.tensor_series("stale_norm"), block.tensor_series("grad_norm")
    outside = {t for t, lr in enumerate(layout.tensor_lr) if lr is None}
    found: dict[int, tuple[int, float]] = {}
    for r in probe_rows(block):
        step = int(block.steps[r])
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = stale[r] / norms[r]
        for t, share in enumerate(shares):
            if not np.isfinite(share) or norms[r, t] == 0 or t in outside:
                continue
            first = streak(memory, t, step, bool(share >= STALE_SHARE), STALE_PROBES)
            if first is not None:
                found[t] = (first, float(share))
    if not found:
        return []
    tensors = sorted(found)
    share = float(np.median([s for _, s in found.values()]))
    return [
        Finding(
            kind="stale_gradients",
            layer=layout.common_module(tensors),
            step=min(first for first, _ in found.values()),
            last_step=int(block.steps[-1]),
            severity="error",
            message=(
                f"{share:.0%} (median) of the gradient of {len(tensors)} tensors "
                f"({_listed(layout, tensors)}) was already in .grad before the step's backward, "
                f"on {STALE_PROBES}+ probe steps in a row: the gradients of earlier steps are "
                "never cleared, so each update follows the running sum of all past gradients "
                "instead of this batch's. Likely cause: optimizer.zero_grad() is missing, or "
                "clears another model or only part of this one."
            ),
            evidence={
                "stale_share": share,
                "tensors": [layout.tensors[t] for t in tensors[:20]],
            },
            remedy=(
                "call optimizer.zero_grad() once per optimizer step, before loss.backward() (or "
                "right after optimizer.step()); with gradient accumulation, clear after the step "
                "that ends each accumulation"
            ),
        )
    ]


def no_gradient(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """Trainable, watched tensors that have had no non-zero gradient (`.grad` None or exactly 0)
    in any of the run's first NO_GRADIENT_STEPS or more recorded steps (for tensors trained in
    fp16, and in a run with a ReLU whose units are all dead, only a None `.grad` counts: an
    all-zero one may be underflow or dead units, which `underflow` and `dead_units` name).

    A real problem: the loss does not reach them, so they never learn. Named by cause: modules
    that never ran in a forward pass, and modules that ran but whose output is cut from the loss
    (`.detach()`, `.data`, `torch.no_grad()`, an output not used); or, when no tensor of the
    model has a gradient at `optimizer.step()`, the step itself. A tensor that gets a gradient on
    some steps only (an auxiliary head) is not named; frozen parameters are not watched.
    """
    got: set[int] = memory.setdefault("got", set())
    norms, none = block.tensor_series("grad_norm"), block.tensor_series("grad_none")
    received = (norms != 0) & (none != 1) & ~np.isnan(norms)  # NaN/Inf gradients are gradients
    # An all-zero gradient is not a cut graph where fp16 underflow or dead units explain it
    # (`underflow`'s and `dead_units`' findings): there only None counts.
    explained = _zeros_explained(block, layout, memory)
    received[:, explained] |= none[:, explained] == 0
    got.update(np.flatnonzero(received.any(axis=0)).tolist())
    memory["steps"] = memory.get("steps", 0) + len(block.steps)
    missing = [t for t in range(len(layout.tensors)) if t not in got]
    if memory["steps"] < NO_GRADIENT_STEPS or not missing:
        return []
    first, last = int(memory.setdefault("first", int(block.steps[0]))), int(block.steps[-1])
    if not got:
        return [
            Finding(
                kind="no_gradient",
                layer="",
                step=first,
                last_step=last,
                severity="error",
                message=(
                    f"no watched parameter had a non-zero gradient when optimizer.step() ran, in "
                    f"{memory['steps']} recorded steps: every update applies nothing (or only "
                    "weight decay and momentum). Likely cause: optimizer.zero_grad() between "
                    "loss.backward() and optimizer.step(), a loss computed under torch.no_grad() "
                    "or from detached outputs, or backward() never called."
                ),
                evidence={"recorded_steps": memory["steps"], "tensors": len(layout.tensors)},
                remedy=(
                    "order each step as zero_grad(), forward, loss.backward(), optimizer.step(); "
                    "check that the loss has a grad_fn (loss.requires_grad is True)"
                ),
            )
        ]
    position = {name: c for c, name in enumerate(layout.modules)}
    never_called = [
        t for t in missing if not _called(layout, position.get(layout.tensor_modules[t]))
    ]
    cut = [t for t in missing if t not in never_called]
    findings = []
    for tensors, called in ((cut, True), (never_called, False)):
        if tensors:
            findings.append(_no_gradient_finding(layout, tensors, called, first, last, memory))
    return findings


def _zeros_explained(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[int]:
    """Tensors whose all-zero gradients something else explains: they train in fp16, or the run
    has had a ReLU with DEAD_UNITS_ALL of its units dead at a probe step (it passes no gradient
    to what is upstream and feeds zeros to what is downstream)."""
    dead = block.module_series("dead_frac")[:, [c for c, z in enumerate(layout.zeroing) if z]]
    if dead.size and np.nanmax(np.nan_to_num(dead, nan=0.0)) >= DEAD_UNITS_ALL:
        memory["all_dead_seen"] = True
    if memory.get("all_dead_seen"):
        return list(range(len(layout.tensors)))
    return [t for t in range(len(layout.tensors)) if layout.precision(t) == "float16"]


def _called(layout: ModelLayout, column: int | None) -> bool:
    """Whether the module at `column` ran in a forward pass (unknown modules count as called)."""
    return column is None or not layout.called or layout.called[column]


def _no_gradient_finding(
    layout: ModelLayout, tensors: list[int], called: bool, first: int, last: int, memory: Memory
) -> Finding:
    position = {name: c for c, name in enumerate(layout.modules)}
    modules = sorted({layout.tensor_modules[t] for t in tensors}, key=lambda m: position.get(m, -1))
    if called:
        where = (
            f"their modules run in the forward pass, but the loss does not depend on them: the "
            f"graph is cut at or after the output of {modules[-1]!r} (the last of them in "
            "forward order)"
        )
        cause = (
            "a .detach() or .data on an activation, part of the forward under torch.no_grad(), "
            "or an output that never reaches the loss"
        )
        remedy = (
            f"remove the .detach()/.data/torch.no_grad() between {modules[-1]!r} and the loss, "
            "or use its output in the loss; if these parameters are meant to stay fixed, freeze "
            "them with requires_grad_(False)"
        )
    else:
        where = "their modules never ran in a forward pass"
        cause = "layers defined in __init__ but not called in forward(), or a branch never taken"
        remedy = (
            "call these modules in forward() or delete them; if they are kept on purpose, freeze "
            "them with requires_grad_(False) (DDP needs find_unused_parameters=True otherwise)"
        )
    return Finding(
        kind="no_gradient",
        layer=layout.common_module(tensors) or modules[-1],
        step=first,
        last_step=last,
        severity="error" if called else "warning",
        message=(
            f"{len(tensors)} trainable tensors ({_listed(layout, tensors)}) had no gradient "
            f"(.grad None or exactly 0) in {memory['steps']} recorded steps while the rest of "
            f"the model had one: {where}. They never learn. Likely cause: {cause}."
        ),
        evidence={
            "tensors": [layout.tensors[t] for t in tensors[:20]],
            "modules": modules[:20],
            "called_in_forward": called,
            "recorded_steps": memory["steps"],
        },
        remedy=remedy,
    )


def not_updated(block: StatsBlock, layout: ModelLayout, memory: Memory) -> list[Finding]:
    """Tensors with a non-zero gradient that the optimizer leaves exactly unchanged
    (`update_ratio` 0) on PERSISTENT_PROBES probe steps in a row.

    A real problem: the gradient is computed and thrown away. Named by cause, from the optimizer's
    parameter groups at the first flush: not in any group (a module replaced or added after the
    optimizer was built, an optimizer built from the frozen part), or a learning rate of 0.
    Steps a guard skipped are not counted; tensors without a gradient are `no_gradient`'s, and
    those whose gradient is below NEGLIGIBLE_GRAD of the step's largest tensor gradient are left
    out (their update may round away: a bias right before a BatchNorm, or the early layers of a
    net whose gradient vanishes, which `vanishing` names), as are fp16/bf16 parameters (an
    update below their resolution rounds away: a precision problem).
    """
    found = _unchanged(block, layout, memory)
    if not found:
        return []
    lrs = layout.tensor_lr or (1.0,) * len(layout.tensors)
    outside = sorted(t for t in found if lrs[t] is None)
    zero_lr = sorted(t for t in found if lrs[t] == 0)
    other = sorted(t for t in found if t not in outside and t not in zero_lr)
    findings = []
    for tensors, cause, remedy in (
        (outside, _outside_cause(layout, outside), _OUTSIDE_REMEDY),
        (zero_lr, "their parameter group's learning rate is 0", _ZERO_LR_REMEDY),
        (
            other,
            "they are in the optimizer with a non-zero learning rate, yet the update is undone "
            "or never applied (a scheduler that set the lr to 0 later, weights restored after "
            "each step)",
            _ZERO_LR_REMEDY,
        ),
    ):
        if tensors:
            findings.append(
                Finding(
                    kind="not_updated",
                    layer=layout.common_module(tensors),
                    step=min(found[t] for t in tensors),
                    last_step=int(block.steps[-1]),
                    severity="error",
                    message=(
                        f"{len(tensors)} tensors ({_listed(layout, tensors)}) get non-zero "
                        "gradients, but the optimizer leaves them exactly unchanged (update "
                        f"ratio 0) for {PERSISTENT_PROBES}+ probe steps in a row: they do not "
                        f"learn. Likely cause: {cause}."
                    ),
                    evidence={
                        "tensors": [layout.tensors[t] for t in tensors[:20]],
                        "in_optimizer": bool(tensors[0] not in outside),
                    },
                    remedy=remedy,
                )
            )
    return findings


def _unchanged(block: StatsBlock, layout: ModelLayout, memory: Memory) -> dict[int, int]:
    """The tensors with a moving gradient left unchanged on PERSISTENT_PROBES probe steps in a
    row, each with the first step of its streak."""
    if "update_ratio" not in block.tensor_stats:
        return {}
    ratios, norms = block.tensor_series("update_ratio"), block.tensor_series("grad_norm")
    skipped = _skipped_steps(block)
    found: dict[int, int] = {}
    for r in probe_rows(block):
        step = int(block.steps[r])
        live = moving(norms[r])
        if step in skipped or not live.any():
            continue
        for t in range(len(layout.tensors)):
            if not (np.isfinite(ratios[r, t]) and live[t]):
                continue
            if not layout.updates_representable(t):
                continue
            first = streak(memory, t, step, bool(ratios[r, t] == 0), PERSISTENT_PROBES)
            if first is not None:
                found[t] = first
    return found


def _outside_cause(layout: ModelLayout, outside: list[int]) -> str:
    lrs = layout.tensor_lr or ()
    if lrs and all(lr is None for lr in lrs):
        return (
            "the optimizer holds none of the model's trainable parameters: it was built from "
            "frozen ones (requires_grad=False), from another model, or before the model's "
            "parameters were replaced"
        )
    return (
        "they are in none of the optimizer's parameter groups: a module replaced or added after "
        "the optimizer was built, or an optimizer built from part of the model"
    )


_OUTSIDE_REMEDY = (
    "build the optimizer after the model is final, from the parameters meant to train "
    "(torch.optim.AdamW(model.parameters()) or [p for p in model.parameters() if "
    "p.requires_grad]); if these are meant to stay fixed, freeze them with requires_grad_(False), "
    "which also saves their backward"
)
_ZERO_LR_REMEDY = (
    "give their parameter group a non-zero learning rate (check the scheduler's factor at these "
    "steps); if they are meant to stay fixed, freeze them with requires_grad_(False)"
)
