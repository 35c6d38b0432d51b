"""What `gw.watch()` accepts: the schedule (`WatchConfig`) and the checks of its arguments, which
fail at call time with a message that names the problem and the fix, never mid-training."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.arguments import count
from gradwatch.guards.base import Guard
from gradwatch.inventory import optimizer_parameters


@dataclass(frozen=True)
class WatchConfig:
    """The knobs of `watch()`, with what each costs.

    every: record `grad_norm` and `global_grad_norm` every `every` optimizer steps. Cost per
        recorded step: one pass over the gradients and a few small kernels.
        Each probed module adds one `sum` over its output (the non-finite flag).
    probe_every: every `probe_every` steps is a probe step that also records `grad_max`,
        `grad_nonfinite`, `param_norm`, `update_ratio` and the module statistics: one copy of the
        parameters held during `optimizer.step()`, about five more passes, and a tensor hook and
        a few reductions per probed module. None turns probe steps off.
    flush_every: recorded steps per block. Device memory: flush_every x (tensors x 12 + modules x
        11) x 4 bytes; one device-to-host copy and one committed database transaction per block. A
        killed process loses at most the steps since the last flush.
    histogram_every: every `histogram_every`-th probe step (counted in probe steps: the first
        one, then every n-th) also counts the histograms `grad_hist` and `act_hist` (see
        `stats/histograms.py`): about ten element-wise passes over a copy of the gradients and
        over each probed module's output, and an `index_add_`. On 2 CPU cores that adds 0.4x to
        1.9x a plain step to such a probe step, so the default takes them on every tenth probe
        step (every 100 steps with probe_every=10). None turns them off.
    per_example: on probe steps, also each example's gradient norm (`pe_norm_*` per tensor,
        `pe_total_*` and the gradient noise scale `gns_simple` as scalars; see
        `stats/per_example.py`): True or "mean" when the loss is the batch mean (of each
        micro-batch, divided by their number under gradient accumulation), "sum" for summed
        losses. Costs a per-example computation per module on probe steps (Gram matrices or
        materialised per-example gradients, a torch.func fallback for modules without a rule).
        Without it, `gns_simple` still comes from a step's micro-batches or DDP ranks when it
        has two or more (`stats/noise_scale.py`).
    """

    run_dir: str
    every: int = 1
    probe_every: int | None = 10
    flush_every: int = 50
    histogram_every: int | None = 10
    per_example: bool | str = False

    def __post_init__(self) -> None:
        if self.per_example not in (False, True, "mean", "sum"):
            raise ValueError(
                f'per_example must be False, True (= "mean") or "sum", got {self.per_example!r}'
            )
        for name in ("every", "flush_every", "probe_every", "histogram_every"):
            value = getattr(self, name)
            if name in ("probe_every", "histogram_every") and value is None:
                continue
            optional = name in ("probe_every", "histogram_every")
            count(name, value, " (or None to turn them off)" if optional else "")

    # The schedule: which steps are recorded, probed, and count histograms.
    def records(self, step: int) -> bool:
        return step % self.every == 0 or self.probes(step)

    def probes(self, step: int) -> bool:
        return self.probe_every is not None and step % self.probe_every == 0

    def histograms(self, step: int) -> bool:
        """Every `histogram_every`-th probe step, counted in probe steps (the first included)."""
        every, probe_every = self.histogram_every, self.probe_every
        return every is not None and self.probes(step) and (step // probe_every) % every == 0  # type: ignore[operator]


# What the watcher calls on a guard: checked at watch(), not discovered mid-training.
_GUARD_METHODS = ("apply", "events", "state_dict", "load_state_dict")


def label_guards(guards: Sequence[Any], optimizer: Any) -> list[Guard]:
    """Check the guards and give each a unique label: its class name, numbered on repeats."""
    guards = list(guards)
    for guard in guards:
        missing = [f"{m}()" for m in _GUARD_METHODS if not callable(getattr(guard, m, None))]
        if not hasattr(guard, "runs_on_skipped_steps"):
            missing.append("runs_on_skipped_steps")
        if missing:
            raise TypeError(
                f"guards must be gradwatch guards, got {guard!r}, which has no "
                f"{', '.join(missing)}; subclass gw.guards.Guard (it supplies events(), "
                "state_dict(), load_state_dict() and runs_on_skipped_steps) and implement "
                "apply(ctx)"
            )
        if not isinstance(guard.runs_on_skipped_steps, bool):
            raise TypeError(
                f"{type(guard).__name__}.runs_on_skipped_steps must be a bool, got "
                f"{guard.runs_on_skipped_steps!r}"
            )
    if guards and optimizer is None:
        raise ValueError(
            "guards act inside optimizer.step(): pass the optimizer, gw.watch(model, optimizer, "
            "guards=...)"
        )
    seen: dict[str, int] = {}
    for guard in guards:
        name = type(guard).__name__
        seen[name] = seen.get(name, 0) + 1
        guard.label = name if seen[name] == 1 else f"{name}_{seen[name]}"
    return guards


def check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch() needs a torch.nn.Module as model, got {type(model).__name__}")
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"the {type(model).__name__} has no trainable parameters (requires_grad=True): "
            "there are no gradients to watch"
        )
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    owned = {id(p) for p in optimizer_parameters(optimizer)}
    missing = [name for pid, name in trainable.items() if pid not in owned]
    frozen = [
        name for name, p in model.named_parameters() if id(p) in owned and not p.requires_grad
    ]
    if len(missing) == len(trainable) and frozen:
        # A real bug (the optimizer was built from the frozen part): watch, and let the
        # `not_updated` finding say what is wrong, rather than stop the user's training.
        warnings.warn(
            f"the optimizer holds only frozen parameters of the model ({', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''}) and none of its {len(trainable)} trainable "
            "ones: nothing will train; gradwatch watches and reports it as `not_updated`",
            stacklevel=3,
        )
        return
    if len(missing) == len(trainable):
        raise ValueError(
            "the optimizer holds none of the model's parameters; build it from this model, "
            "e.g. torch.optim.AdamW(model.parameters()), or pass the model it trains"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(
            f"{len(missing)} trainable parameters of the model are not in the optimizer "
            f"({shown}); gradwatch watches them, but the optimizer does not update them",
            stacklevel=3,
        )
