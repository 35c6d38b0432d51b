"""The scale of the model's input features, on probe steps.

The first layer's weight gradient is δ·xᵀ: each input feature scales its own column of it. Inputs
far from normalised (raw pixels in 0..255, prices next to ages) give that layer a gradient
dominated by the largest features and an effective learning rate that differs by their ratio.

From the model's first floating-point tensor argument x of the step's first forward pass (integer
token ids are not features), per feature (the last axis; the channel axis 1 for 4+ dimensions)
the root mean square over all other axes and over every probe step so far (running sums on the
device: a sparse column of standardised data, near its mean in most batches, has the RMS of the
data set, not of one batch), over the *dense* features only: those non-zero in at least half of
the values (one-hot and bag-of-words columns are mostly zero; their RMS says how often they
occur, not how large they are). The sums start again when the number of features changes.
Scalars, probe steps:

- `input_rms_max`  the largest dense feature's RMS;
- `input_rms_min`  the smallest non-zero dense feature's RMS (NaN when there is none).

Cost: one pass over x and three reductions per probe step; no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.stats.hooks import Shield, eager_unless_traced, unshielded

INPUT_SCALARS: tuple[str, ...] = ("input_rms_max", "input_rms_min")
# A feature is dense when it is non-zero in at least this share of its values.
DENSE_SHARE = 0.5


def feature_sums(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per feature of `x` (see the module docstring): the sum of squares and the count of
    non-zero values over all other axes, and the number of values summed (a 0-d tensor: a count
    that grows as a Python number would make torch.compile specialise on it each probe step)."""
    x = x.detach().float()
    feature_dim = 1 if x.dim() >= 4 else x.dim() - 1
    others = tuple(d for d in range(x.dim()) if d != feature_dim)
    count = torch.full((), x.numel() // max(x.shape[feature_dim], 1), device=x.device)
    if not others:
        return x.square(), x.ne(0).float(), count
    return x.square().sum(dim=others), x.ne(0).float().sum(dim=others), count


def feature_scales(squares: Tensor, nonzero: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """(largest, smallest non-zero) RMS over the dense features, from `feature_sums` (added up
    over batches); NaN where there is none."""
    rms = (squares / count).sqrt()
    dense = nonzero / count >= DENSE_SHARE
    largest = torch.where(dense, rms, -torch.inf).max()
    smallest = torch.where(dense & (rms > 0), rms, torch.inf).min()
    return (
        torch.where(torch.isfinite(largest), largest, torch.nan),
        torch.where(torch.isfinite(smallest), smallest, torch.nan),
    )


class InputScale:
    """A forward pre-hook on the model that measures the feature scales of the first forward
    pass of each probe step."""

    def __init__(self, model: nn.Module, *, shield: Shield = unshielded) -> None:
        self._model = model
        self.shield = shield
        self.probe = False
        self._scales: tuple[Tensor, Tensor] | None = None
        self._sums: tuple[Tensor, Tensor, Tensor] | None = None  # over the probe steps so far
        self.handles: list[Any] = []

    def attach(self) -> None:
        self.handles.append(
            self._model.register_forward_pre_hook(self.shield(self._measure), with_kwargs=True)
        )

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def take(self) -> dict[str, Tensor]:
        """The scalars of the probe step now ending (empty when no float input was seen)."""
        scales, self._scales = self._scales, None
        return dict(zip(INPUT_SCALARS, scales, strict=True)) if scales is not None else {}

    def _measure(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.probe or self._scales is not None or not torch.is_grad_enabled():
            return
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        readable = first is not None and first.layout == torch.strided and not first.is_nested
        if readable and first.is_floating_point() and first.numel() > 0:
            sums = feature_sums(first)
            if self._sums is None or self._sums[0].shape != sums[0].shape:
                self._sums = tuple(t.clone() for t in sums)
            else:  # in place: the same tensors every probe step, nothing for compile to guard on
                for total, part in zip(self._sums, sums, strict=True):
                    total.add_(part)
            self._scales = feature_scales(*self._sums)


eager_unless_traced(InputScale._measure)
