"""Module probes: the backpropagated signal, activation health and where non-finite values start.

Which modules are probed: those that own parameters directly (Linear, Conv, norms, attention, ...),
activation modules (ReLU, GELU, Sigmoid, ...) and custom leaf modules (user code with no children,
where a log, a division or an exp can make the first NaN), in the order of their first forward
call. Residual blocks are not probed as such: their inner layers are.

Per-module statistics and when they run (y = the module's output, units = the last axis, or the
channel axis for outputs of 4 or more dimensions):

- `act_nonfinite`  1 if y held a NaN/±Inf at this step, else 0. Every recorded step on modules
                   with parameters and custom modules (one `sum` over y each: a NaN/Inf anywhere
                   makes the sum non-finite); on probe steps also on torch.nn activations, which
                   cannot turn finite inputs into NaN/Inf, so skipping them every step loses no
                   origin and halves the cost on conv nets.
- `signal_norm`    ‖∂L/∂y‖₂, the backpropagated signal at the module's output, from a tensor hook
                   on y (not a full backward hook, which breaks on in-place activations).
                   Probe steps.
- `act_mean`, `act_std`  mean and standard deviation of y. Probe steps.
- `dead_frac`      share of units whose output is 0 for every example of the batch. Probe steps.
- `saturated_frac` share of outputs within 1% (of the output range) of a bound, for bounded
                   activations (sigmoid, tanh, hardtanh, hardsigmoid, softsign); NaN for others.
                   Probe steps.

Nothing here syncs with the host: values stay device tensors until the step's row is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

MODULE_STATS: tuple[str, ...] = (
    "signal_norm",
    "act_mean",
    "act_std",
    "dead_frac",
    "saturated_frac",
    "act_nonfinite",
)
SIGNAL_NORM, ACT_MEAN, ACT_STD, DEAD_FRAC, SATURATED_FRAC, ACT_NONFINITE = range(len(MODULE_STATS))

# Activations whose output is exactly 0 for a dead unit.
ZEROING_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
# Bounded activations and their output range, read from the module.
SATURATING_BOUNDS: dict[type[nn.Module], Callable[[Any], tuple[float, float]]] = {
    nn.Sigmoid: lambda m: (0.0, 1.0),
    nn.Tanh: lambda m: (-1.0, 1.0),
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
    nn.Hardsigmoid: lambda m: (0.0, 1.0),
    nn.Softsign: lambda m: (-1.0, 1.0),
}
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    *ZEROING_ACTIVATIONS,
    *SATURATING_BOUNDS,
    nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Softplus, nn.LogSigmoid, nn.Tanhshrink,
)  # fmt: skip


def saturation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation, or None."""
    for kind, bounds in SATURATING_BOUNDS.items():
        if isinstance(module, kind):
            return bounds(module)
    return None


def owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def is_custom_leaf(module: nn.Module) -> bool:
    """A module of the user's own (not torch.nn's) with no child modules."""
    return not type(module).__module__.startswith("torch.nn.") and not any(
        True for _ in module.children()
    )


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module gradwatch probes, in `named_modules()` order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, ACTIVATIONS) or owns_parameters(module) or is_custom_leaf(module)
    ]


def activation_stats(y: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    """[act_mean, act_std, dead_frac, saturated_frac] of one output, float32, on y's device."""
    y = y.detach().float()
    std, mean = torch.std_mean(y)
    if y.dim() >= 2:
        unit_dim = 1 if y.dim() >= 4 else y.dim() - 1
        others = tuple(d for d in range(y.dim()) if d != unit_dim)
        dead = y.abs().amax(dim=others).eq(0).float().mean()
    else:
        dead = torch.full_like(mean, torch.nan)
    if bounds is None:
        saturated = torch.full_like(mean, torch.nan)
    else:
        low, high = bounds
        half = (high - low) / 2
        saturated = (y - (low + half)).abs().ge(0.98 * half).float().mean()
    return torch.stack([mean, std, dead, saturated])


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a module produced: the output itself, or the first tensor of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


class ModuleProbes:
    """Forward hooks on the probed modules that collect one step's module statistics.

    `mode` tells the hooks what the forward pass in progress belongs to: 0 = a step that is not
    recorded, 1 = a recorded step (non-finite flags only), 2 = a probe step (everything); the
    watcher sets it whenever its step counter moves. Passes
    under `torch.no_grad()` (evaluation) are ignored. `write(row)` moves what was collected into a
    buffer row [modules, len(MODULE_STATS)] and starts afresh; forward passes of gradient
    accumulation add up (a NaN in any micro-batch flags the step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.types: list[str] = []
        self._modules: list[nn.Module] = []
        self._bounds: list[tuple[float, float] | None] = []
        for name, module in probed_modules(model):
            self.names.append(name)
            self.types.append(type(module).__name__)
            self._modules.append(module)
            self._bounds.append(saturation_bounds(module))
        # The modules whose outputs are flagged every recorded step (see `act_nonfinite`).
        self._flagged_every_step = [owns_parameters(m) or is_custom_leaf(m) for m in self._modules]
        self.forward_order: list[int] = []  # columns in the order of their first forward call
        self._seen: set[int] = set()
        self.mode = 0
        self._sums: dict[int, Tensor] = {}
        self._activations: dict[int, Tensor] = {}
        self._signals: dict[int, Tensor] = {}
        self._unsupported: set[int] = set()
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self.handles: list[Any] = []

    def attach(self) -> None:
        for column, module in enumerate(self._modules):
            self.handles.append(module.register_forward_hook(self._hook(column)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._sums.clear()
        self._activations.clear()
        self._signals.clear()

    def zeroing(self, column: int) -> bool:
        return isinstance(self._modules[column], ZEROING_ACTIVATIONS)

    def saturating(self, column: int) -> bool:
        return self._bounds[column] is not None

    def builtin(self, column: int) -> bool:
        """Whether the module is one of torch.nn's own layers (not a user's custom module)."""
        return type(self._modules[column]).__module__.startswith("torch.nn.")

    def owns_parameters(self, column: int) -> bool:
        return owns_parameters(self._modules[column])

    def _hook(self, column: int) -> Callable[[nn.Module, Any, Any], None]:
        flagged_every_step = self._flagged_every_step[column]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if column not in self._seen:
                self._seen.add(column)
                self.forward_order.append(column)
            mode = self.mode
            if mode == 0 or (mode == 1 and not flagged_every_step):
                return
            y = first_tensor(output)
            if y is None or not y.is_floating_point():
                self._warn_unsupported(column, output)
                return
            total = torch.sum(y.detach(), dtype=torch.float32)
            previous = self._sums.get(column)
            self._sums[column] = total if previous is None else previous + total
            if mode == 2:
                self._activations[column] = activation_stats(y, self._bounds[column])
                if y.requires_grad:
                    y.register_hook(self._signal_hook(column))

        return hook

    def _signal_hook(self, column: int) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            previous = self._signals.get(column)
            self._signals[column] = norm if previous is None else torch.hypot(previous, norm)

        return record

    def write(self, row: Tensor) -> None:
        """Move the collected statistics into `row` and clear them. No host sync."""
        if self._sums:
            flags = torch.stack(list(self._sums.values())).isfinite().logical_not().float()
            self._put(row, ACT_NONFINITE, ACT_NONFINITE + 1, self._sums, flags[:, None])
        if self._activations:
            values = torch.stack(list(self._activations.values()))
            self._put(row, ACT_MEAN, SATURATED_FRAC + 1, self._activations, values)
        if self._signals:
            values = torch.stack(list(self._signals.values()))
            self._put(row, SIGNAL_NORM, SIGNAL_NORM + 1, self._signals, values[:, None])
        self._sums.clear()
        self._activations.clear()
        self._signals.clear()

    def _put(self, row: Tensor, start: int, stop: int, source: dict[int, Tensor], values: Tensor):
        key = tuple(source)
        index = self._index_cache.get(key)
        if index is None:
            index = torch.tensor(key, dtype=torch.long, device=row.device)
            self._index_cache[key] = index
        row[:, start:stop].index_copy_(0, index, values.to(row.device, non_blocking=True))

    def _warn_unsupported(self, column: int, output: Any) -> None:
        if column in self._unsupported:
            return
        self._unsupported.add(column)
        warnings.warn(
            f"gradwatch cannot probe module {self.names[column]!r} "
            f"({self.types[column]}): its output is a {type(output).__name__}, not a floating "
            "tensor; it is left out of the per-module statistics",
            stacklevel=2,
        )
