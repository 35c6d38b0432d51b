"""Clipping guards: ClipNorm, ClipValue, AGC, AutoClip, ZClip.

Each decides and scales on the device with no host sync; what it did is recorded as per-step
scalars (`<label>.norm`, `<label>.scale`, ...) and turned into `clip` events at flush time.
Under FSDP2 every norm is the whole tensor's (shard partials all-reduced), so all ranks scale alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.arguments import count, positive
from gradwatch.guards.base import Event, Guard, GuardContext, clip_events
from gradwatch.stats.grads import max_abs


def _clip_to(ctx: GuardContext, label: str, norm: Tensor, threshold: Tensor | float) -> None:
    """Scale the gradients so their norm is at most `threshold`; record norm and scale.

    The scale is exactly 1 for a norm within the threshold (no event), else threshold / (norm +
    1e-6): the rule of `clip_grad_norm_` above the threshold.
    """
    scale = torch.where(norm > threshold, threshold / (norm + 1e-6), 1.0)
    ctx.scale_grads(scale)
    ctx.record(f"{label}.norm", norm)
    ctx.record(f"{label}.scale", scale)


def _largest(ctx: GuardContext) -> Tensor:
    """max |g| over every gradient (over every shard: one MAX all-reduce under FSDP2)."""
    device = ctx.global_norm.device
    local = torch.stack([max_abs(g).max().to(device) for g in ctx.grads()]).max()
    return ctx.shards.max(local.reshape(1)).reshape(())


class ClipNorm(Guard):
    """Scale all gradients so that their total `norm_type`-norm is at most `max_norm`.

    Same rule and result as `torch.nn.utils.clip_grad_norm_`: g ← g · min(1, max_norm /
    (‖g‖ + 1e-6)); a non-finite norm makes the gradients non-finite (pair it with SkipNonFinite).
    No host sync. Cost: free for the 2-norm of untouched gradients (gradwatch computed it), else
    one pass; plus one scaling pass.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = positive("max_norm", max_norm)
        self.norm_type = float(norm_type)
        if not (self.norm_type == math.inf or self.norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
        self.label = "ClipNorm"

    def apply(self, ctx: GuardContext) -> None:
        _clip_to(ctx, self.label, self._total_norm(ctx), self.max_norm)

    def _total_norm(self, ctx: GuardContext) -> Tensor:
        if self.norm_type == 2.0:
            return ctx.current_norm()
        if self.norm_type == math.inf:
            return _largest(ctx)
        device = ctx.global_norm.device
        powers = [
            torch.stack(torch._foreach_norm(g, self.norm_type, dtype=torch.float32))
            .double()
            .pow(self.norm_type)
            .sum()
            .to(device)
            for g in ctx.grads()
        ]
        total = ctx.shards.sum(torch.stack(powers).sum().reshape(1)).reshape(())
        return total.pow(1 / self.norm_type).float()

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        return clip_events(self, steps, scalars)


class ClipValue(Guard):
    """Clamp every gradient entry to [-clip_value, clip_value].

    Records the largest |g| before clamping as `<label>.norm` (one extra pass) so clipped steps
    become events. No host sync.
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = positive("clip_value", clip_value)
        self.label = "ClipValue"

    def apply(self, ctx: GuardContext) -> None:
        largest = _largest(ctx)
        for grads in ctx.grads():
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        ctx.mark_modified()
        ctx.record(f"{self.label}.norm", largest)
        ctx.record(f"{self.label}.scale", torch.clamp(self.clip_value / largest, max=1.0))

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        return clip_events(self, steps, scalars)


class AGC(Guard):
    """Unit-wise adaptive gradient clipping: keep each unit's gradient-to-weight ratio bounded.

    For each output unit i of a weight (row i; axis 0 of a conv kernel):
    ‖W_i‖* = max(‖W_i‖, eps); if ‖G_i‖ > clipping · ‖W_i‖*, then G_i ← G_i · clipping · ‖W_i‖* /
    ‖G_i‖. Tensors of one dimension (biases, norm scales) use their whole-tensor norm. Parameters
    whose name starts with one of `exclude` (e.g. the final classifier, as the paper advises) are
    left alone (a name matches a prefix that is a whole module path: "fc" excludes "fc.weight",
    not "fc2.weight"). No host sync; cost: one small reduction per tensor and one scaling pass.
    Under FSDP2 the rows of a weight sharded on dim 0 are whole on their rank; the norms of
    one-dimensional tensors are all-reduced (one collective for all of them).

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition Without
        Normalization. ICML 2021 (arXiv:2102.06171).
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()):
        self.clipping = positive("clipping", clipping)
        self.eps = positive("eps", eps)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = tuple(exclude)
        self.label = "AGC"

    def apply(self, ctx: GuardContext) -> None:
        pairs = [
            (param.detach(), grad)
            for names, params, grads in ctx.groups
            for name, param, grad in zip(names, params, grads, strict=True)
            if not any(name == e or name.startswith(e + ".") for e in self.exclude)
        ]
        if not pairs:
            return
        device = ctx.global_norm.device
        whole = [
            torch.stack(
                [torch.linalg.vector_norm(t, dtype=torch.float32).square() for t in pair]
            ).to(device)
            for pair in pairs
            if pair[0].dim() <= 1
        ]
        # Squared whole-tensor norms of the 1-D tensors, summed over shards in one collective.
        sums = iter(ctx.shards.sum(torch.stack(whole)).sqrt() if whole else ())
        clipped = [
            self._clip(weight, grad, None if weight.dim() > 1 else next(sums))
            for weight, grad in pairs
        ]
        ctx.mark_modified()
        ctx.record(f"{self.label}.clipped_units", torch.stack(clipped).to(device).sum())

    def _clip(self, weight: Tensor, grad: Tensor, whole_norms: Tensor | None) -> Tensor:
        """Clip one tensor's units; `whole_norms` holds [‖W‖, ‖G‖] of a 1-D tensor."""
        if whole_norms is None:
            weight_norms = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=torch.float32)
            grad_norms = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float32)
        else:
            weight_norms, grad_norms = (
                whole_norms[:1].to(grad.device),
                whole_norms[1:].to(grad.device),
            )
        limit = self.clipping * weight_norms.clamp_min(self.eps)
        scale = torch.clamp(limit / grad_norms.clamp_min(1e-6), max=1.0)
        grad.mul_(
            scale.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1)))
            if weight.dim() > 1
            else scale.to(grad.dtype)
        )
        return (scale < 1.0).sum().float()

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        counts = scalars.get(f"{self.label}.clipped_units")
        if counts is None:
            return []
        return [
            Event("clip", int(s), self.label, {"clipped_units": int(c)})
            for s, c in zip(steps, counts, strict=True)
            if c > 0
        ]


class AutoClip(Guard):
    """Clip the global norm to the `percentile`-th percentile of the norms seen so far.

    The history holds the global (pre-guard) norm of every step since the start, the current
    step's included (as in the reference implementation), or of the last `history` steps.
    Non-finite norms are left out of the percentile. No host sync; cost per step: a percentile of
    the history on the device (a sort), which grows with the history: set `history` (e.g. 1000)
    for long runs.

    References:
        Seetharaman, Wichern, Pardo, Le Roux. AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks. MLSP 2020 (arXiv:2007.14469).
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if history is not None and (not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be None or an int >= 1, got {history!r}")
        self.percentile = float(percentile)
        self.history = history
        self.label = "AutoClip"
        self._norms: Tensor | None = None
        self._count = 0

    def apply(self, ctx: GuardContext) -> None:
        norm = ctx.current_norm().float()
        self._append(torch.where(torch.isfinite(norm), norm, torch.nan))
        if self.history is None:
            seen = self._norms[: self._count]
        else:
            seen = self._norms[: min(self._count, self.history)]
        threshold = torch.nanquantile(seen, self.percentile / 100)
        _clip_to(ctx, self.label, norm, threshold)
        ctx.record(f"{self.label}.threshold", threshold)

    def _append(self, norm: Tensor) -> None:
        capacity = self.history or 1024
        if self._norms is None:
            self._norms = torch.full((capacity,), torch.nan, device=norm.device)
        self._norms = self._norms.to(norm.device)  # after load_state_dict, state is on the CPU
        if self.history is None and self._count == len(self._norms):
            self._norms = torch.cat([self._norms, torch.full_like(self._norms, torch.nan)])
        slot = self._count if self.history is None else self._count % self.history
        self._norms[slot] = norm
        self._count += 1

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        return clip_events(self, steps, scalars)

    def state_dict(self) -> dict[str, Any]:
        norms = None if self._norms is None else self._norms.detach().cpu().clone()
        return {"norms": norms, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms, self._count = state["norms"], int(state["count"])
        if self._norms is not None:
            self._norms = self._norms.clone()


class ZClip(Guard):
    """Clip gradient-norm spikes found by a z-score against EMAs of the norm's mean and variance.

    Warm-up: the first `warmup` norms set μ (their mean) and σ² (their variance); no clipping.
    Then z = (‖g‖ − μ) / (σ + eps); if z > z_threshold, ‖g‖ is clipped to the adaptive threshold
    μ + z_threshold² · σ / z, which bites harder the larger the spike. The EMAs update with the
    clipped norm: μ ← αμ + (1−α)x, σ² ← ασ² + (1−α)(x − μ)². Non-finite norms leave the EMAs
    alone. No host sync; cost: a few scalar kernels and one scaling pass.

    References:
        Kumar, Owen, Chowdhury, Güra. ZClip: Adaptive Spike Mitigation for LLM Pre-Training.
        2025 (arXiv:2504.02507).
    """

    def __init__(
        self, alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25, eps: float = 1e-6
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.z_threshold = positive("z_threshold", z_threshold)
        self.warmup = count("warmup", warmup)
        self.eps = float(eps)
        self.label = "ZClip"
        self._seen = 0
        self._warmup_norms: Tensor | None = None
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    def apply(self, ctx: GuardContext) -> None:
        norm = ctx.current_norm().float()
        if self._seen < self.warmup:
            self._collect(norm)
            return
        assert self._mean is not None and self._var is not None
        self._mean, self._var = self._mean.to(norm.device), self._var.to(norm.device)
        std = self._var.sqrt()
        z = (norm - self._mean) / (std + self.eps)
        spike = z > self.z_threshold
        threshold = torch.where(spike, self._mean + self.z_threshold**2 * std / z, norm)
        _clip_to(ctx, self.label, norm, threshold)
        ctx.record(f"{self.label}.mean", self._mean.clone())
        ctx.record(f"{self.label}.std", std)
        effective = torch.minimum(norm, threshold)
        finite = torch.isfinite(effective)
        mean = self.alpha * self._mean + (1 - self.alpha) * effective
        var = self.alpha * self._var + (1 - self.alpha) * (effective - mean) ** 2
        self._mean = torch.where(finite, mean, self._mean)
        self._var = torch.where(finite, var, self._var)

    def _collect(self, norm: Tensor) -> None:
        if self._warmup_norms is None:
            self._warmup_norms = torch.full((self.warmup,), torch.nan, device=norm.device)
        self._warmup_norms = self._warmup_norms.to(norm.device)
        self._warmup_norms[self._seen] = torch.where(torch.isfinite(norm), norm, torch.nan)
        self._seen += 1
        if self._seen == self.warmup:
            self._mean = torch.nanmean(self._warmup_norms)
            self._var = torch.nanmean((self._warmup_norms - self._mean) ** 2)

    def events(self, steps: np.ndarray, scalars: Mapping[str, np.ndarray]) -> list[Event]:
        return clip_events(self, steps, scalars)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": self._seen,
            "warmup_norms": _copied(self._warmup_norms, "cpu"),
            "mean": _copied(self._mean, "cpu"),
            "var": _copied(self._var, "cpu"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Copies: the warm-up writes into its norms in place, never into the caller's state.
        self._seen = int(state["seen"])
        self._warmup_norms = _copied(state["warmup_norms"])
        self._mean, self._var = _copied(state["mean"]), _copied(state["var"])


def _copied(t: Tensor | None, device: str | None = None) -> Tensor | None:
    """A copy of `t` (on `device`, if given) that shares no memory with it; None stays None."""
    return None if t is None else t.detach().to(device or t.device, copy=True)
