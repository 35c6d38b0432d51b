"""The `Guard` protocol, the `GuardContext` a guard acts through, the `Event` record, and
`StopTraining`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.distributed import LOCAL, Reduction
from gradwatch.inventory import optimizer_parameters
from gradwatch.stats.grads import global_norm, l2_norms

EVENT_KINDS: tuple[str, ...] = ("clip", "skip", "rollback")


class StopTraining(RuntimeError):
    """Raised by a guard the user chose when training cannot go on (`Rollback` out of
    rollbacks). The one exception gradwatch lets into the user's training, on purpose: its
    failsafe catches every other (DESIGN invariant 8)."""


@dataclass(frozen=True, slots=True)
class Event:
    """What a guard did at a step: `kind` is one of EVENT_KINDS, `detail` holds its numbers."""

    kind: str
    step: int
    guard: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuardContext:
    """What a guard sees and may do in the optimizer's step pre-hook, before the update.

    `groups` holds (names, params, grads) per (device, dtype) for the watched parameters that have a
    gradient; guards change the gradients in place. `global_norm` is the L2 norm of all gradients
    before any guard (a device tensor); `current_norm()` is the norm after the guards so far.
    `record(name, value)` stores a device scalar with the step (no host sync); `event(e)` records
    an action decided on the host; `skip_step()` makes the optimizer leave every parameter and its
    state untouched this step.

    Under torch.distributed, `groups` hold this rank's gradients (its shards under FSDP2) and
    the norms are the whole model's: `shards` reduces partial statistics over the ranks that
    share a parameter (FSDP2; the identity otherwise), `ranks` over every rank, for decisions
    that all ranks must take together (`any_rank`).
    """

    step: int
    groups: list[tuple[list[str], list[nn.Parameter], list[Tensor]]]
    global_norm: Tensor
    optimizer: torch.optim.Optimizer | None
    model: nn.Module
    loss: Tensor | float | None
    record: Callable[[str, Tensor], None]
    event: Callable[[Event], None]
    shards: Reduction = LOCAL
    ranks: Reduction = LOCAL
    skipped: bool = False
    _modified: bool = False

    def grads(self) -> list[list[Tensor]]:
        """The gradients, one list per (device, dtype) group, for foreach kernels."""
        return [grads for _, _, grads in self.groups]

    def mark_modified(self) -> None:
        """Say that this guard changed the gradients (so `current_norm` recomputes)."""
        self._modified = True

    def current_norm(self) -> Tensor:
        """L2 norm of the gradients as they are now; free unless an earlier guard changed them."""
        if not self._modified:
            return self.global_norm
        partials = [
            torch.linalg.vector_norm(l2_norms(g)).to(self.global_norm.device) for g in self.grads()
        ]
        return global_norm(torch.linalg.vector_norm(torch.stack(partials)), self.shards)

    def any_rank(self, flag: Tensor) -> Tensor:
        """Whether `flag` (a device bool scalar) is set on any rank: one all-reduce across ranks
        under torch.distributed, no collective otherwise. No host sync."""
        return self.ranks.max(flag.float().reshape(1)).reshape(()) > 0

    def scale_grads(self, scale: Tensor) -> None:
        """Multiply every gradient by a device scalar: one foreach kernel per group, no sync."""
        for grads in self.grads():
            torch._foreach_mul_(grads, scale.to(grads[0].device, grads[0].dtype))
        self.mark_modified()

    def skip_step(self) -> None:
        """Drop this step's gradients: optimizers leave parameters whose `.grad` is None, and
        their state, untouched, so the update is skipped without touching the optimizer."""
        params = (
            optimizer_parameters(self.optimizer)
            if self.optimizer is not None
            else [p for _, ps, _ in self.groups for p in ps]
        )
        for p in params:
            p.grad = None
        self.skipped = True


class Guard(Protocol):
    """Acts on the gradients of one optimizer step, in order with the other guards.

    `apply(ctx)` runs in the step pre-hook on the real (unscaled, under GradScaler) gradients.
    `events(steps, scalars)` turns what `apply` recorded with `ctx.record` into events, at flush
    time on the host (so clipping needs no host sync). `state_dict()`/`load_state_dict()` carry the
    guard's state across a resumed run. `label` names the guard in events and scalar names; the
    watcher sets it (the class name, numbered if a class appears twice).
    """

    label: str
    runs_on_skipped_steps: bool = False  # True: apply() still runs after a guard skipped the step

    def apply(self, ctx: GuardContext) -> None: ...

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def clip_events(guard: Guard, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
    """Clip events from the `<label>.norm` and `<label>.scale` scalars a clipping guard records:
    one event per step whose scale was below 1."""
    norms = scalars.get(f"{guard.label}.norm")
    scales = scalars.get(f"{guard.label}.scale")
    if norms is None or scales is None:
        return []
    return [
        Event(
            "clip",
            int(step),
            guard.label,
            {"norm": float(n), "scale": float(s), "clipped_to": float(n * s)},
        )
        for step, n, s in zip(steps, norms, scales, strict=True)
        if s < 1.0
    ]
