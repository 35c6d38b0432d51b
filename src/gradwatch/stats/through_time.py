"""Gradients through time: how far back the backpropagated signal reaches in a recurrent module.

Backpropagated through T time steps, the gradient is multiplied by the recurrent Jacobian T times
(Hochreiter 1991; Bengio, Simard and Frasconi 1994; Pascanu, Mikolov and Bengio 2013): it
vanishes or explodes over time as a deep feed-forward net's does over depth.

Which modules: `nn.RNN`, `nn.LSTM`, `nn.GRU` (one call sees the whole sequence; its time axis is
0, or 1 with `batch_first`, or the packed layout of a `PackedSequence`) and the cells
`nn.RNNCell`, `nn.LSTMCell`, `nn.GRUCell` (one call per time step: step t is the cell's t-th call
since the model's forward began). Loops over time written with other modules (a Linear applied
to [x_t, h]) are not recognised.

On probe steps the module's input sequence x is replaced by an alias of itself (a view when x
requires grad, so nothing upstream changes; a fresh leaf when it does not, so nothing is
detached) whose tensor hook adds ‖∂L/∂x_t‖² for each time step t into a preallocated profile of
`TIME_POINTS` positions (sequences longer than that are pooled into buckets of
⌈T / TIME_POINTS⌉ consecutive steps). Summed over micro-batches and, with one all-reduce per probe
step, over ranks: `profile[t] = √Σ‖∂L/∂x_t‖² / world_size`, the norm for the global batch's loss,
as `signal_norm` is. The summary per module (columns of the per-module statistics), with L the
last time step whose gradient is non-zero (trailing zeros are padding no loss reaches):

- `time_first_to_last`  profile[0] / profile[L]: what reaches the first step, relative to the last.
- `time_decay`          the factor per time step, (profile[f] / profile[L])^(1 / (L − f)), f the
                        first step with a non-zero gradient (the gradient may underflow to 0).
- `time_reach`          how many time steps back from L the gradient stays above 1/1000 of
                        profile[L]; the whole sequence when it never falls below.

Cost: probe steps only: one alias and one reduction of ∂L/∂x per call of each recurrent module,
and for each a few element-wise ops on a vector of `TIME_POINTS`. No host sync: the time axis
lengths are read from shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch.distributed import LOCAL, Reduction
from gradwatch.stats.device import constant, to_device
from gradwatch.stats.hooks import Shield, eager_unless_traced, unshielded

# Positions of the stored profile; longer sequences are pooled into buckets of consecutive steps.
TIME_POINTS = 1024
# time_reach: the gradient "survives" while it is above this share of its size at the last step.
SURVIVAL = 1e-3
TIME_STATS: tuple[str, ...] = ("time_first_to_last", "time_decay", "time_reach")

_SEQUENCE_MODULES = (nn.RNNBase,)
_CELLS = (nn.RNNCellBase,)


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the recurrent modules gradwatch profiles through time."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _SEQUENCE_MODULES + _CELLS)
    ]


class TimeProbes:
    """Forward pre-hooks on the recurrent modules that profile ∂L/∂x over time on probe steps.

    `probe` is set by the watcher (through `ProbeRecords`): True while the forward pass in
    progress belongs to a probe step. `write(row, cells)` fills the per-module statistics row
    and returns the step's profiles [modules, TIME_POINTS] (NaN where no time step was seen),
    then starts afresh.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        ranks: Reduction = LOCAL,
        world_size: int = 1,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self.shield = shield
        found = recurrent_modules(model)
        self.names = [name for name, _ in found]
        self._modules = [module for _, module in found]
        self._model = model
        self.device = device
        self.ranks, self.world_size = ranks, world_size
        self.probe = False
        # Per module and time position: [Σ‖∂L/∂x_t‖², how many inputs covered the position].
        self._squares = torch.zeros(len(found), 2, TIME_POINTS, device=device)
        self._bucket = [1] * len(found)  # time steps per position at this step
        self._cell_calls = [0] * len(found)
        self._too_long: set[int] = set()
        self._positions: dict[tuple[int, int], Tensor] = {}  # (T, bucket) -> position per step
        self.handles: list[Any] = []

    def attach(self) -> None:
        if not self._modules:
            return
        self.handles.append(self._model.register_forward_pre_hook(self.shield(self._restart_cells)))
        for index, module in enumerate(self._modules):
            self.handles.append(
                module.register_forward_pre_hook(self.shield(self._hook(index)), with_kwargs=True)
            )

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._squares.zero_()

    def _restart_cells(self, module: nn.Module, args: Any) -> None:
        self._cell_calls = [0] * len(self._modules)

    def _hook(self, index: int) -> Callable[..., Any]:
        module = self._modules[index]
        is_cell = isinstance(module, _CELLS)

        @eager_unless_traced
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.probe or not torch.is_grad_enabled():
                return None
            if is_cell:
                step = self._cell_calls[index]
                self._cell_calls[index] += 1
                if step >= TIME_POINTS:
                    self._warn_too_long(index)
                    return None
            in_kwargs = not args and "input" in kwargs
            x = kwargs["input"] if in_kwargs else args[0] if args else None
            if not _trains_through(module, x):
                return None
            if isinstance(x, PackedSequence):
                data = _alias(x.data)
                recorder = self._packed_recorder(index, x.batch_sizes, data.device)
                data.register_hook(self.shield(recorder))
                x = x._replace(data=data)
            else:
                x = _alias(x)
                if is_cell:
                    x.register_hook(self.shield(self._step_recorder(index, step)))
                else:
                    time_dim = 1 if module.batch_first and x.dim() == 3 else 0
                    x.register_hook(self.shield(self._sequence_recorder(index, time_dim)))
            if in_kwargs:
                return args, {**kwargs, "input": x}
            return (x, *args[1:]), kwargs

        return hook

    def _sequence_recorder(self, index: int, time_dim: int) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:  # in backward; the shape is fixed by then
            others = tuple(d for d in range(grad.dim()) if d != time_dim)
            squares = torch.linalg.vector_norm(grad, dim=others, dtype=torch.float32).square()
            self._add(index, squares, self._position(index, squares.shape[0]))

        return record

    def _packed_recorder(
        self, index: int, batch_sizes: Tensor, device: torch.device
    ) -> Callable[[Tensor], None]:
        # A PackedSequence keeps its batch sizes on the host: the time step of each packed row
        # is worked out there, and copied to the device asynchronously.
        steps = torch.arange(len(batch_sizes)).repeat_interleave(batch_sizes)  # host data: CPU
        steps = to_device(steps, device)
        position = self._position(index, len(batch_sizes))

        def record(grad: Tensor) -> None:
            rows = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square()
            squares = torch.zeros(len(batch_sizes), device=grad.device).index_add_(0, steps, rows)
            self._add(index, squares, position)

        return record

    def _step_recorder(self, index: int, step: int) -> Callable[[Tensor], None]:
        position = self._position(index, TIME_POINTS)[step : step + 1]  # a view: no copy

        def record(grad: Tensor) -> None:
            squares = torch.linalg.vector_norm(grad, dtype=torch.float32).square().reshape(1)
            self._add(index, squares, position)

        return record

    def _position(self, index: int, length: int) -> Tensor:
        """The profile position of each of `length` time steps (buckets past TIME_POINTS)."""
        bucket = math.ceil(length / TIME_POINTS)
        self._bucket[index] = max(self._bucket[index], bucket)
        key = (length, bucket)
        if key not in self._positions:
            self._positions[key] = torch.arange(length, device=self.device) // bucket
        return self._positions[key]

    def _add(self, index: int, squares: Tensor, position: Tensor) -> None:
        covered = torch.stack(
            [squares.to(self.device), torch.ones_like(squares, device=self.device)]
        )
        self._squares[index].index_add_(1, position, covered)

    def write(self, row: Tensor, cells: tuple[Tensor, Tensor]) -> Tensor:
        """The summary of this probe step into the per-module statistics `row` at `cells`
        (row indices of the recurrent modules, column indices of TIME_STATS); returns the profiles
        [recurrent modules, TIME_POINTS]. One all-reduce over the ranks; no host sync."""
        totals = self.ranks.sum(self._squares.clone())
        self._squares.zero_()
        profile = torch.where(totals[:, 1] > 0, totals[:, 0].sqrt() / self.world_size, torch.nan)
        bucket = constant(tuple(self._bucket), profile.device, profile.dtype)
        self._bucket = [1] * len(self._modules)
        row[cells] = time_summary(profile, bucket).to(row)
        return profile

    def _warn_too_long(self, index: int) -> None:
        if index in self._too_long:
            return
        self._too_long.add(index)
        warnings.warn(
            f"gradwatch profiles the gradient through time of {self.names[index]!r} over its "
            f"first {TIME_POINTS} calls per forward pass only; later time steps are left out",
            stacklevel=3,
        )


def time_summary(profile: Tensor, bucket: Tensor) -> Tensor:
    """[modules, 3]: `time_first_to_last`, `time_decay`, `time_reach` of profiles [modules, T]
    (NaN past each one's end; `bucket` time steps per position), as the module docstring defines
    them; NaN where no step has a non-zero gradient. No host sync."""
    width = profile.shape[1]
    positions = torch.arange(width, device=profile.device).expand_as(profile)
    nonzero = profile > 0  # NaN compares False
    none = torch.full_like(positions, -1)
    last = torch.where(nonzero, positions, none).amax(dim=1)
    first = torch.where(nonzero, positions, torch.full_like(positions, width)).amin(dim=1)
    at_last = profile.gather(1, last.clamp_min(0)[:, None]).squeeze(1)
    at_first = profile.gather(1, first.clamp_max(width - 1)[:, None]).squeeze(1)
    steps = (last - first).to(profile.dtype) * bucket
    decay = torch.where(steps > 0, (at_first / at_last) ** (1 / steps.clamp_min(1)), torch.nan)
    # Not above the threshold (NaN: a position no input reached) before the last step.
    below = ~(profile >= SURVIVAL * at_last[:, None]) & (positions <= last[:, None])
    reach = (last - torch.where(below, positions, none).amax(dim=1)).to(profile.dtype) * bucket
    summary = torch.stack([profile[:, 0] / at_last, decay, reach], dim=1)
    return torch.where((last >= 0)[:, None], summary, torch.nan)


def _alias(x: Tensor) -> Tensor:
    """x as a new autograd node whose gradient is what flows into the module: a view when x
    requires grad (upstream receives the same gradient), else a fresh leaf (x has no graph)."""
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_()


def _trains_through(module: nn.Module, x: Any) -> bool:
    """Whether the gradient through time of `x` is part of training: x comes from trainable
    layers, or the module itself trains. (A frozen module on plain data: nothing to profile.)"""
    data = x.data if isinstance(x, PackedSequence) else x
    if not isinstance(data, Tensor) or not data.is_floating_point():
        return False
    return data.requires_grad or any(p.requires_grad for p in module.parameters())
