"""What the module probes (`flow.py`) read of a module and of its output: which modules are
probed (parameters, activations, custom leaves), the range of a bounded activation, the summable
moments and the firing units of an output, and the tensor a module produced. No host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch.distributed import module_class

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


def is_builtin(module: nn.Module) -> bool:
    """Whether the module is one of torch.nn's own (also under FSDP2's wrapper class)."""
    return module_class(module).__module__.startswith("torch.nn.")


def is_custom_leaf(module: nn.Module) -> bool:
    """A module of the user's own (not torch.nn's) with no child modules."""
    return not is_builtin(module) and not any(True for _ in module.children())


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module gradwatch probes, in `named_modules()` order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, ACTIVATIONS) or owns_parameters(module) or is_custom_leaf(module)
    ]


def activation_moments(y: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    """The summable moments of one output, float64: [n, n·mean, n·mean², (n−1)·var, saturated].

    Summed over micro-batches and ranks they give the pooled mean Σn·m / N and variance
    (Σ(n−1)·var + Σn·m² − N·mean²) / (N − 1); the saturated count is NaN for unbounded modules.

    The sums run per row of the first axis in float32 (a sum and a norm: the CPU's fastest
    reductions, 14x faster than `torch.var_mean` on a CNN's activations) over y − y[0], shifted so
    that a large mean does not cancel, and are added up in float64: relative error ≤ 3e-6 against
    float64 on ReLU, offset and token activations. A vector or an empty output: two passes in
    float64.
    """
    y = y.detach().float()
    n = y.numel()
    if y.dim() < 2 or n == 0:
        wide = y.double()
        mean = wide.mean() if n else wide.new_zeros(())
        spread = (wide - mean).square().sum()
    else:
        shift = y.reshape(-1)[0]
        rows = (y - shift).reshape(y.shape[0], -1)
        total = rows.sum(dim=1).double().sum()
        square = torch.linalg.vector_norm(rows, dim=1).double().square().sum()
        mean = shift.double() + total / n
        spread = (square - total * total / n).clamp_min(0)
    if bounds is None:
        saturated = torch.full_like(mean, torch.nan)
    else:
        low, high = bounds
        half = (high - low) / 2
        saturated = (y - (low + half)).abs().ge(0.98 * half).sum().double()
    return torch.stack([torch.full_like(mean, n), n * mean, n * mean * mean, spread, saturated])


def fired_units(y: Tensor) -> Tensor | None:
    """1 for each unit (last axis; channel axis for 4+ dims) that is non-zero for some example,
    else 0; None for outputs of fewer than 2 dimensions."""
    if y.dim() < 2:
        return None
    unit_dim = 1 if y.dim() >= 4 else y.dim() - 1
    others = tuple(d for d in range(y.dim()) if d != unit_dim)
    return y.detach().abs().amax(dim=others).ne(0).float()


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a module produced: the output itself, the data of a `PackedSequence` (an RNN's
    packed output), or the first of these in a tuple/list."""
    if isinstance(output, PackedSequence):
        return output.data
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in map(first_tensor, output) if t is not None), None)
    return None
