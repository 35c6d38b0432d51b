"""Recovery guards: SkipNonFinite drops a poisoned step, Rollback restores the last good state."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.arguments import count
from gradwatch.distributed import local_tensor, shard_like
from gradwatch.guards.base import Event, Guard, GuardContext, StopTraining
from gradwatch.inventory import optimizer_parameters


class SkipNonFinite(Guard):
    """Skip the optimizer step when any gradient holds a NaN or Inf.

    The step's gradients are dropped (`.grad = None`), so the optimizer leaves every parameter and
    its state (momentum, Adam moments, step counts) untouched; a `skip` event is recorded.
    Under torch.distributed every rank skips when any rank's gradients (or shards) hold a NaN/Inf:
    one small all-reduce per step.
    Host sync: one scalar per step (whether the gradient norm is finite). Cost: nothing else.
    """

    def __init__(self) -> None:
        self.label = "SkipNonFinite"
        self.skipped = 0

    def apply(self, ctx: GuardContext) -> None:
        if ctx.skipped:
            return
        poisoned = ctx.any_rank(~torch.isfinite(ctx.current_norm()))
        if bool(poisoned):  # host sync: skipping is a host decision
            ctx.skip_step()
            self.skipped += 1
            ctx.event(Event("skip", ctx.step, self.label, {"reason": "non-finite gradients"}))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])


@dataclass(frozen=True)
class _Snapshot:
    """Host copies of this rank's model state (its shards under FSDP2), of the optimizer state
    per parameter position, and of the param groups' settings."""

    step: int
    model: dict[str, Tensor]
    optimizer: dict[int, dict[str, Any]]
    groups: tuple[dict[str, Any], ...]
    lrs: tuple[float, ...]


def _to_host(value: Any) -> Any:
    if isinstance(value, Tensor):
        return local_tensor(value.detach()).to("cpu", copy=True)
    return value


def _take_snapshot(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    state = optimizer.state
    return _Snapshot(
        step=step,
        model={k: _to_host(v) for k, v in model.state_dict().items()},
        optimizer={
            i: {k: _to_host(v) for k, v in state[p].items()}
            for i, p in enumerate(optimizer_parameters(optimizer))
            if p in state
        },
        groups=tuple({k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups),
        lrs=tuple(g["lr"] for g in optimizer.param_groups),
    )


@torch.no_grad()
def _restore(snapshot: _Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Copy the snapshot back in place, each rank into its own shards: parameters, buffers and
    optimizer state keep their identity (and their DTensor layout under FSDP2)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, Tensor):
            local_tensor(tensor.detach()).copy_(snapshot.model[name])
    for i, p in enumerate(optimizer_parameters(optimizer)):
        saved = snapshot.optimizer.get(i)
        if saved is None:
            optimizer.state.pop(p, None)  # no state yet at the snapshot: the optimizer starts anew
            continue
        live = optimizer.state[p]
        for key, value in saved.items():
            current = live.get(key)
            if isinstance(value, Tensor) and isinstance(current, Tensor):
                local_tensor(current).copy_(value)
            elif isinstance(value, Tensor):
                device = local_tensor(p.detach()).device
                live[key] = shard_like(p, value.to(device, copy=True))
            else:
                live[key] = value
    for group, saved_group in zip(optimizer.param_groups, snapshot.groups, strict=True):
        group.update(saved_group)


class Rollback(Guard):
    """Restore the last good model and optimizer state when training diverges, with a lower lr.

    Every `every` steps, while training is healthy, the model's and the optimizer's state dicts
    are copied to host memory (the last `keep` copies are held). At a step whose gradients are
    non-finite, whose last logged `loss` (from `w.log(loss=...)`) is non-finite or above
    `divergence` times the median of the last `window` healthy losses, or after `max_skips`
    consecutive skipped steps, the guard restores the newest snapshot (an older one if training
    diverged again before a new snapshot was taken), multiplies every param group's lr by
    `lr_factor`, skips the step and records a `rollback` event. After `max_rollbacks` rollbacks
    it raises an error that says what to change.

    Host sync: one read of a few scalars per step (gradient norm and loss), plus the snapshot
    copies. Memory: `keep` copies of the model and optimizer state in host RAM. An lr scheduler
    that sets the lr from scratch each step overrides the lowered lr. Snapshots are not part of
    `state_dict()`. Under torch.distributed each rank snapshots its own state (its shards under
    FSDP2) and the decision is shared: the loss is the mean over ranks, the gradients count as
    non-finite where any rank's are (one small all-reduce per step); all ranks roll back together.
    """

    def __init__(
        self,
        every: int = 100,
        keep: int = 2,
        lr_factor: float = 0.5,
        max_rollbacks: int = 5,
        divergence: float = 10.0,
        window: int = 50,
        max_skips: int = 3,
    ) -> None:
        for name, value in (
            ("every", every),
            ("keep", keep),
            ("max_rollbacks", max_rollbacks),
            ("window", window),
            ("max_skips", max_skips),
        ):
            count(name, value)
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        if not divergence > 1:
            raise ValueError(f"divergence must be > 1, got {divergence!r}")
        self.every, self.keep, self.lr_factor = every, keep, float(lr_factor)
        self.max_rollbacks, self.divergence, self.max_skips = max_rollbacks, divergence, max_skips
        self.label = "Rollback"
        self.runs_on_skipped_steps = True  # consecutive skips are one of its triggers
        self.rollbacks = 0
        self._losses: deque[float] = deque(maxlen=window)
        self._snapshots: deque[_Snapshot] = deque(maxlen=keep)
        self._skips = 0
        self._fresh_since_rollback = True
        self._ignore_loss_at = -1

    def apply(self, ctx: GuardContext) -> None:
        if ctx.optimizer is None:
            raise RuntimeError("Rollback needs the optimizer: pass it to gw.watch()")
        if not self._snapshots:  # the state before the first update is the first good one
            self._snapshot(ctx)
        reason = self._diagnose(ctx)
        if reason is not None:
            self._roll_back(ctx, reason)
        elif not ctx.skipped and (
            not self._snapshots or ctx.step - self._snapshots[-1].step >= self.every
        ):
            self._snapshot(ctx)

    def _diagnose(self, ctx: GuardContext) -> str | None:
        loss = ctx.loss if ctx.step != self._ignore_loss_at else None
        norm = ctx.current_norm().float()
        if isinstance(loss, Tensor):  # the logged loss, still on the device
            loss_value = loss.detach().double().reshape(()).to(norm.device)
        else:  # a Python number, or none logged: a fill, no copy
            loss_value = torch.full((), math.nan if loss is None else loss, device=norm.device)
            loss_value = loss_value.double()
        logged = torch.full((), float(loss is not None), dtype=torch.float64, device=norm.device)
        # Summed over ranks: how many ranks have non-finite gradients, the loss total, how many
        # ranks logged one and how many of those losses are non-finite.
        packed = torch.stack(
            [
                (~torch.isfinite(norm)).double(),
                torch.where(torch.isfinite(loss_value), loss_value, 0.0),
                logged,
                logged * (~torch.isfinite(loss_value)).double(),
            ]
        )
        # host sync: the rollback decision is made on the host
        bad_norm, loss_total, loss_count, bad_loss = ctx.ranks.sum(packed).tolist()
        norm = math.inf if bad_norm > 0 else 0.0
        if loss is not None and loss_count > 0:
            loss_value = math.nan if bad_loss > 0 else loss_total / loss_count
        self._skips = self._skips + 1 if ctx.skipped else 0
        if self._skips >= self.max_skips:
            return f"{self._skips} consecutive skipped steps"
        if ctx.skipped:
            return None
        if not math.isfinite(norm):
            return "non-finite gradients"
        if loss is None:
            return None
        if not math.isfinite(loss_value):
            return "non-finite loss"
        if len(self._losses) >= 10:
            level = float(np.median(self._losses))
            if loss_value > self.divergence * max(level, 1e-12):
                return f"loss {loss_value:.4g} is {loss_value / level:.1f}x its running median"
        self._losses.append(loss_value)
        return None

    def _snapshot(self, ctx: GuardContext) -> None:
        assert ctx.optimizer is not None
        self._snapshots.append(_take_snapshot(ctx.step, ctx.model, ctx.optimizer))
        self._fresh_since_rollback = True

    def _roll_back(self, ctx: GuardContext, reason: str) -> None:
        assert ctx.optimizer is not None
        if self.rollbacks >= self.max_rollbacks:
            raise StopTraining(
                f"Rollback gave up at step {ctx.step} after {self.rollbacks} rollbacks: training "
                f"keeps diverging ({reason}). Lower the learning rate, check the data around "
                "this step, or raise max_rollbacks"
            )
        if not self._fresh_since_rollback and len(self._snapshots) > 1:
            self._snapshots.pop()  # it diverged again from this one: go further back
        snapshot = self._snapshots[-1]
        current_lrs = [g["lr"] for g in ctx.optimizer.param_groups]
        _restore(snapshot, ctx.model, ctx.optimizer)
        for group, old, now in zip(
            ctx.optimizer.param_groups, snapshot.lrs, current_lrs, strict=True
        ):
            group["lr"] = min(old, now) * self.lr_factor
        ctx.skip_step()
        self.rollbacks += 1
        self._skips = 0
        self._fresh_since_rollback = False
        self._ignore_loss_at = ctx.step + 1  # the next logged loss is this diverged step's
        ctx.event(
            Event(
                "rollback",
                ctx.step,
                self.label,
                {
                    "reason": reason,
                    "restored_step": snapshot.step,
                    "rollbacks": self.rollbacks,
                    "lr": [g["lr"] for g in ctx.optimizer.param_groups],
                },
            )
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "losses": list(self._losses), "skips": self._skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self._losses.clear()
        self._losses.extend(state["losses"])
        self._skips = int(state["skips"])
