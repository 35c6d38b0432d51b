"""The gradient noise scale B_simple, from the gradients of a step's parts, smoothed over probe
steps.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, App. A):
with |G_B|² the squared norm of the gradient of a batch of B examples, unbiased estimates of the
true gradient's squared norm and of the trace of the per-example covariance follow from two batch
sizes B_small < B_big:

    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

B_big is the step's batch (its gradient is the step's); |G_small|² is the mean over the step's n
equal parts of the squared norm of each part's gradient, B_small = B_big / n:
- with `per_example`, the parts are the examples (B_small = 1, `per_example.py`);
- otherwise the parts the step is made of anyway, when there are two or more: the micro-batches
  of gradient accumulation and the ranks of DDP (`PartialGradients`: on probe steps a tensor
  hook on each watched parameter adds ‖g‖² of each backward's local gradient, before DDP
  averages it; B_small is the first dimension of the model's first tensor input).
Both estimates are noisy, so each is smoothed with its own exponential moving average (`BETA`,
initialised with the first estimate, no bias correction), and B_simple = tr(Σ)_ema / |G|²_ema.
Nothing is reported for the first `WARM_UP` estimates, nor while |G|²_ema ≤ 0 (when the noise
dominates, the estimate of |G|² can be negative): B_simple is then NaN. Runs on the device; no
host sync. Recorded as the scalars `gns_simple` and `gns_batch` (B_big).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.distributed import LOCAL, Reduction
from gradwatch.stats.hooks import Shield, eager_unless_traced, unshielded

NOISE_SCALARS: tuple[str, ...] = ("gns_simple", "gns_batch")
BETA = 0.9
WARM_UP = 3


class NoiseScale:
    """B_simple, updated from each probe step's part and batch gradient norms."""

    def __init__(self) -> None:
        self._trace: Tensor | None = None
        self._square: Tensor | None = None
        self._count = 0

    def update(
        self, small_square: Tensor, big_square: Tensor, parts: int, part_size: float = 1.0
    ) -> Tensor:
        """Take one step's mean squared norm of its `parts` parts' gradients (each of
        `part_size` examples) and its batch gradient's squared norm; return the smoothed B_simple
        in examples (0-dim, NaN during warm-up or while |G|²_ema ≤ 0)."""
        if parts < 2:  # one part: no second batch size to compare with
            return torch.full((), torch.nan, device=big_square.device)
        small, big = small_square.double(), big_square.double()
        square = (parts * big - small) / (parts - 1)
        trace = part_size * (small - big) / (1 - 1 / parts)
        if self._trace is None or self._square is None:
            self._trace, self._square = trace, square
        else:
            self._trace = BETA * self._trace + (1 - BETA) * trace
            self._square = BETA * self._square + (1 - BETA) * square
        self._count += 1
        if self._count <= WARM_UP:
            return torch.full_like(trace, torch.nan).float()
        ratio = self._trace / self._square
        return torch.where(self._square > 0, ratio, torch.nan).float()


class PartialGradients:
    """The squared norms of the local gradients of a step's parts (micro-batches, ranks), for
    B_simple without per-example norms (see the module docstring).

    A forward pre-hook on the model counts the forward passes of each step (the parts of this
    rank) and reads the examples per part. On a probe step that follows a step of two or more
    parts (or under DDP) it also hooks every watched parameter, so that each backward adds
    ‖g‖² of the parameter's gradient before it is accumulated or averaged. Cost: on such probe
    steps one norm per parameter per backward; otherwise one Python call per forward.
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        device: torch.device,
        ranks: Reduction = LOCAL,
        world_size: int = 1,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self._model, self._params = model, params
        self.shield = shield
        self.ranks, self.world_size = ranks, world_size
        self.noise = NoiseScale()
        self.probe = False
        self._parts = self._last_parts = 0
        self._examples: int | None = None  # per part; -1 when the parts differ
        self._squares = torch.zeros((), dtype=torch.float64, device=device)
        self._hooks: list[Any] = []
        self.handles: list[Any] = []

    def attach(self) -> None:
        self.handles.append(
            self._model.register_forward_pre_hook(self.shield(self._count), with_kwargs=True)
        )

    def detach(self) -> None:
        for handle in self.handles + self._hooks:
            handle.remove()
        self.handles.clear()
        self._hooks.clear()

    def next_step(self, probe: bool) -> None:
        """The step counter moved on: the next forward passes belong to a new step."""
        self._last_parts, self._parts, self._examples = self._parts, 0, None
        self.probe = probe

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        self._parts += 1
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        examples = first.shape[0] if first is not None and first.dim() > 0 else -1
        self._examples = examples if self._examples in (None, examples) else -1
        splits = self.world_size > 1 or self._last_parts > 1
        if self.probe and splits and not self._hooks:
            add = self.shield(self._add)
            self._hooks = [p.register_hook(add) for p in self._params if p.requires_grad]

    def _add(self, grad: Tensor) -> None:
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).double().square()
        self._squares += square.to(self._squares.device)

    def record(self, big_square: Tensor) -> tuple[Tensor, float] | None:
        """B_simple and the step's batch size after a probe step whose parts were hooked; None
        otherwise. One all-reduce over the ranks."""
        if not self._hooks:
            return None
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        total = self.ranks.sum(self._squares.clone())
        self._squares.zero_()
        parts = self._parts * self.world_size
        examples = float(self._examples) if self._examples and self._examples > 0 else torch.nan
        # Part i's gradient of its mean loss is k·g_i when the step is k micro-batches long
        # (whether or not the loss was divided by k: B_simple does not change with a common
        # scale), and the step's gradient is the mean over the parts of theirs.
        small = self._parts * total / self.world_size
        return self.noise.update(small, big_square, parts, examples), parts * examples


eager_unless_traced(PartialGradients._count)
