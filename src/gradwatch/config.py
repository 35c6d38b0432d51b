"""What `gw.watch()` accepts: the schedule (`WatchConfig`) and the checks of its arguments, which
fail at call time with a message that names the problem and the fix, never mid-training."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.guards.base import Guard


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
    flush_every: recorded steps per block. Device memory: flush_every x (tensors x 5 + modules x 6)
        x 4 bytes; one device-to-host copy and one committed database transaction per block. A
        killed process loses at most the steps since the last flush.
    """

    run_dir: str
    every: int = 1
    probe_every: int | None = 10
    flush_every: int = 50

    def __post_init__(self) -> None:
        for name in ("every", "flush_every", "probe_every"):
            value = getattr(self, name)
            if name == "probe_every" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                hint = " (or None to turn probe steps off)" if name == "probe_every" else ""
                raise ValueError(f"{name} must be an int >= 1{hint}, got {value!r}")


def label_guards(guards: Sequence[Any], optimizer: Any) -> list[Guard]:
    """Check the guards and give each a unique label: its class name, numbered on repeats."""
    guards = list(guards)
    for guard in guards:
        if not callable(getattr(guard, "apply", None)):
            raise TypeError(
                f"guards must be gradwatch guards (objects with apply(ctx)), got {guard!r}"
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
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for pid, name in trainable.items() if pid not in owned]
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
