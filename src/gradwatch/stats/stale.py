"""`stale_norm`: how much of a step's gradient was carried over from before the step.

PyTorch adds every backward's gradient into `.grad`; the training loop must clear it once per
optimizer step (`optimizer.zero_grad()`, or `set_to_none`). When it never does, `.grad` is the
running sum of all past gradients: the update follows the history, not the batch.

On probe steps a tensor hook on each watched parameter sees each backward's gradient *before*
autograd adds it to `.grad`, so it can read what `.grad` held then:

- at the parameter's first backward of the step, `stale` = ‖.grad‖ (0 when `.grad` is None);
- at a later backward of the same step, `stale` is reset to 0 when `.grad` is None or all zeros
  (it was cleared in between: a GAN's generator backward that also reaches the discriminator,
  followed by the discriminator's own `zero_grad` and backward), else kept.

So gradient accumulation (zero, several backwards, one step) reads 0, and a missing `zero_grad`
reads the norm of the gradient sum of all earlier steps. Cost: on probe steps one tensor hook per
parameter and one norm per backward that finds a gradient there; no host sync (None is seen on
the host, a zero `.grad` is kept on the device with `torch.where`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.stats.hooks import Shield, unshielded


class CarriedGradients:
    """Per watched parameter, the norm of the gradient in `.grad` before the probe step's
    backward passes added theirs (see the module docstring)."""

    def __init__(
        self, params: list[nn.Parameter], device: torch.device, *, shield: Shield = unshielded
    ) -> None:
        self._params = params
        self._shield = shield
        self._norms = torch.zeros(len(params), device=device)
        self._seen: set[int] = set()
        self._hooks: list[Any] = []

    def arm(self) -> None:
        """The next backward passes belong to a probe step: hook the parameters."""
        self.disarm()
        self._norms.zero_()
        self._seen.clear()
        self._hooks = [
            p.register_hook(self._shield(self._hook(i)))
            for i, p in enumerate(self._params)
            if p.requires_grad
        ]

    def disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def take(self) -> Tensor:
        """The norms [params] of the probe step now ending; unhooks the parameters."""
        self.disarm()
        return self._norms.clone()

    def _hook(self, i: int) -> Any:
        param = self._params[i]

        def carried(grad: Tensor) -> None:
            old = param.grad
            slot = self._norms.select(0, i)
            if i not in self._seen:
                self._seen.add(i)
                if old is not None:
                    slot.copy_(_norm(old))
            elif old is None:
                slot.zero_()
            else:
                slot.copy_(torch.where(_norm(old) == 0, 0.0, slot))

        return carried


def _norm(grad: Tensor) -> Tensor:
    """‖grad‖₂ in float32; a sparse gradient (`nn.Embedding(sparse=True)`) by its values."""
    if grad.layout != torch.strided:
        grad = grad.coalesce().values()
    return torch.linalg.vector_norm(grad, dtype=torch.float32)
