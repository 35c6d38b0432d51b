"""Per-example gradient norms on the probe steps of `gw.watch(..., per_example=...)`, and the
statistics they give: quantiles per tensor, the largest example and its share, the noise scale
(`noise_scale.py`), over the global batch under torch.distributed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.distributed import Reduction, Topology
from gradwatch.stats.device import constant
from gradwatch.stats.example_capture import Capture
from gradwatch.stats.ghost_norms import Call
from gradwatch.stats.hooks import Shield, unshielded
from gradwatch.stats.noise_scale import NoiseScale
from gradwatch.stats.per_example import UNREACHED, example_squares

# The scalars a probe step with per_example records (besides `NOISE_SCALARS`).
EXAMPLE_SCALARS: tuple[str, ...] = (
    "pe_examples",
    "pe_total_p50",
    "pe_total_max",
    "pe_total_argmax",
    "pe_top_share",
)


class ExampleProbes:
    """Per-example gradient norms on probe steps, for `gw.watch(..., per_example=...)`.

    The hooks record the probe step's forward passes (one per micro-batch under gradient
    accumulation: each pass holds other examples); `record` turns them into per-example norms
    once the step's gradients exist. Example i's gradient is ∇ℓ_i with `reduction="mean"`: each
    pass's loss the mean over its B_k examples, divided by the K passes of the step (the usual
    accumulation), so ∇ℓ_i = K·B_k × its contribution; with `"sum"` the contribution itself.
    Batch axis 0. Costs the per-example computation of every module on probe steps (see
    `per_example.py`); no host sync except where a fallback loops over examples.

    Under torch.distributed each rank holds its own examples: `record` gathers their norms in
    rank order (the ranks' batch sizes first, read on the host: one sync per probe step), so the
    statistics are the global batch's. The noise scale needs the global batch's mean gradient
    G: DDP's averaged gradient when the ranks' batches are equal (or `reduction="sum"`); when
    they differ, G = Σ_r (B_r/N)·G_r from each rank's own gradient G_r (`LocalGradients`: a kept
    copy of the gradients, added into on probe steps under DDP, and one more all-reduce of it
    when the batches differ). Under
    FSDP2 the ranks' own gradients are out of reach: with unequal batches B_simple is NaN.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        reduction: str,
        device: torch.device,
        topology: Topology,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self.model = model
        self.shield = shield
        self.names = names
        self.reduction = reduction
        self.device = device
        self.topology = topology
        self.noise = NoiseScale()
        self._capture: Capture | None = None
        self._active = False
        self._local: LocalGradients | None = None
        if topology.distributed and not topology.sharded and reduction == "mean":
            params = dict(model.named_parameters())
            self._local = LocalGradients([params[n] for n in names], shield=shield)

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        if self._capture is not None:
            if value:
                self._capture.reserve(self.device)
            self._capture.active = value
        if self._local is not None:
            self._local.armed = value

    def attach(self) -> None:
        self._capture = Capture(self.model, shield=self.shield)
        self._capture.active = self._active
        if self._local is not None:
            self._local.attach()

    def detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture.passes.clear()
            self._capture = None
        if self._local is not None:
            self._local.detach()

    def record(self, step_square: Tensor) -> tuple[ExampleStatistics, Tensor] | None:
        """The step's per-example statistics over the global batch, and the noise scale from
        them and `step_square` (the squared norm of the gradient the step applies); then the
        recorded passes are forgotten. None when no pass was recorded, or a compiled forward
        could not record them all (`Capture`); under torch.distributed every rank returns None
        if one does (one all-gather of the ranks' batch sizes and states, read on the host)."""
        capture = self._capture
        if capture is None:
            return None
        passes, capture.passes = capture.passes, []
        complete = bool(passes) and not capture.incomplete
        sizes = [sum(_pass_batch(calls) or 0 for calls in passes) if complete else 0]
        if self.topology.distributed:
            state = torch.tensor([sizes[0], float(not complete)], device=self.device)
            gathered = self.topology.ranks.gather(state).tolist()
            sizes = [int(size) for size, _ in gathered]
            complete = not any(missing for _, missing in gathered)
        if not complete:
            return None
        capture.resolve(passes)
        capture.active = False  # the fallback re-runs modules: not a pass to record
        try:
            found = self._statistics(passes, self.device)
        finally:
            capture.active = self._active
        if self.topology.distributed:
            found = found.gathered(self.topology.ranks, sizes)
        mean_square = self._mean_gradient_square(step_square, sizes)
        if mean_square is None:
            return found, torch.full((), torch.nan, device=self.device)
        squares = found.totals()
        return found, self.noise.update(squares.mean(), mean_square, squares.numel())

    def _mean_gradient_square(self, step_square: Tensor, sizes: list[int]) -> Tensor | None:
        """|G|² of the global batch's mean gradient G (see the class docstring)."""
        world, examples = len(sizes), sum(sizes)
        if self.reduction == "sum":  # the step's gradient is Σ_i g_i / W
            return step_square * (world / examples) ** 2
        if len(set(sizes)) == 1:
            return step_square
        if self._local is None:
            return None
        rank = self.topology.rank
        return self._local.mean_square(sizes[rank] / examples, self.topology.ranks)

    def _statistics(
        self, passes: list[dict[str, list[Call]]], device: torch.device
    ) -> ExampleStatistics:
        params = dict(self.model.named_parameters())
        parts: list[dict[str, Tensor]] = []
        skipped: dict[str, str] = {}
        for calls in passes:
            batch = _pass_batch(calls)
            if batch is None:
                continue
            squares, missed = example_squares(self.model, calls, batch, 0)
            skipped.update(missed)
            scale = float(batch * len(passes)) if self.reduction == "mean" else 1.0
            part = {}
            for name in self.names:
                if name in squares:
                    part[name] = squares[name].to(device) * scale**2
                elif params[name].grad is None:  # no gradient: no example has one
                    part[name] = torch.zeros(batch, device=device)
                else:
                    skipped.setdefault(name, missed.get(name, UNREACHED))
            parts.append(part)
        examples = sum(len(next(iter(p.values()))) for p in parts if p)
        rows = [
            torch.cat([p[n] for p in parts])
            if all(n in p for p in parts)
            else torch.full((examples,), torch.nan, device=device)
            for n in self.names
        ]
        squares = torch.stack(rows) if rows else torch.zeros((0, examples), device=device)
        return ExampleStatistics(squares, skipped, self.names)


@dataclass
class ExampleStatistics:
    """One probe step's per-example squared norms [tensors, N] (a NaN row for a tensor
    skipped, on this rank or another) and what was skipped on this rank."""

    squares: Tensor
    skipped: dict[str, str]
    names: list[str]

    def quantiles(self) -> Tensor:
        """[tensors, 3]: p50, p95 and max of each tensor's per-example norms (NaN if skipped)."""
        norms = self.squares.sqrt()
        probs = constant((0.5, 0.95), norms.device, norms.dtype)
        return torch.cat([torch.quantile(norms, probs, dim=1).T, norms.amax(dim=1)[:, None]], 1)

    def totals(self) -> Tensor:
        """[N] per-example squared norms over every tensor; NaN if a tensor was skipped."""
        return self.squares.sum(dim=0)

    def gathered(self, ranks: Reduction, sizes: list[int]) -> ExampleStatistics:
        """The statistics of every rank's examples, in rank order, from the ranks' batch
        `sizes`: one all-gather of the norms, padded to the largest batch."""
        padded = self.squares.new_full((len(self.names), max(sizes)), torch.nan)
        padded[:, : self.squares.shape[1]] = self.squares
        every = ranks.gather(padded)
        squares = torch.cat([every[r, :, :n] for r, n in enumerate(sizes)], dim=1)
        return ExampleStatistics(squares, self.skipped, self.names)


class LocalGradients:
    """This rank's own gradient of each parameter, summed over a probe step's backwards before
    DDP averages it (a tensor hook per parameter, armed on probe steps), for the global batch's
    mean gradient when the ranks hold different numbers of examples."""

    def __init__(self, params: list[nn.Parameter], *, shield: Shield = unshielded) -> None:
        self._params = params
        self._add = shield(self._add_grad)
        self._sums: list[Tensor] = []
        self._handles: list[Any] = []
        self._armed = False

    def attach(self) -> None:
        self._handles = [
            p.register_hook(functools.partial(self._add, i)) for i, p in enumerate(self._params)
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sums.clear()

    @property
    def armed(self) -> bool:
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        if value and not self._armed:
            if not self._sums:
                self._sums = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
            torch._foreach_zero_(self._sums)
        self._armed = value

    def _add_grad(self, index: int, grad: Tensor) -> None:
        if self._armed:
            self._sums[index].add_(grad.detach())

    def mean_square(self, weight: float, ranks: Reduction) -> Tensor:
        """|Σ_r weight_r·G_r|² over the ranks: one all-reduce of this rank's weighted gradient."""
        flat = torch.cat([s.flatten() for s in self._sums]).mul_(weight)
        return ranks.sum(flat).double().square().sum()


def _pass_batch(calls: dict[str, list[Call]]) -> int | None:
    """The batch size of one forward pass: axis 0 of its first captured input."""
    for module_calls in calls.values():
        for call in module_calls:
            first = next((a for a in call.args if isinstance(a, Tensor) and a.dim()), None)
            if first is not None:
                return first.shape[0]
    return None
