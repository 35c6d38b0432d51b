"""Ghost-norm rules: per-example squared gradient norms of one module's parameters from its
captured inputs and the signal at its output, without materialising per-example gradients where
an identity allows; and the torch.func fallback for modules without a rule.

The registry (module kind -> rule), as BackPACK keeps one; each rule takes the module's calls of
one forward pass (a module called several times contributes the sum of its calls) and returns,
per parameter, the squared norm of each example's contribution [B]:

- `nn.Linear`, inputs [B, d_in] or [B, T, d_in]: W's example gradient is Σ_t g_t a_tᵀ, and
  ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s): with T² ≤ d_in·d_out from the two [B, T, T] Gram
  matrices (T = 1: ‖a‖²‖g‖²), else from the materialised [B, d_out, d_in]; the bias's is Σ_t g_t.
- `nn.Conv1d`/`nn.Conv2d` (zero padding, groups = 1): the same on the unfolded input patches
  [B, C_in·k, L] with T = L positions.
- `nn.Embedding`: Σ_{t,s} [token_t = token_s ≠ padding_idx] (g_t·g_s), a [B, T, T] Gram matrix.
- `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`, `nn.BatchNorm*d`: the affine weight's example
  gradient is Σ g ⊙ x̂ (x̂ the normalised input), the bias's Σ g, over all but the channel axes.
  BatchNorm in training mode normalises with the batch's statistics, which couple the examples:
  the result treats them as constants, and a warning says so.
- `nn.MultiheadAttention` (packed projections, no bias_k/bias_v): its forward on probe steps
  is written out (`captured_attention.py`), so the outputs of the in-projection and the input
  of `out_proj` and their signals come from the step itself, through its dropout masks; the
  in-projection (`_in_projection`: one linear map per range of its weight rows) and `out_proj`
  follow the Linear rule.
- Anything else (`fallback_squares`): each example's vector-Jacobian product of that module
  alone with its captured signal, by `torch.func` (vmap over the examples; example by example
  where vmap cannot run, as for `nn.LSTM`). It costs a per-example backward of the module and
  materialises its per-example gradients; a warning names the module once. A module with dropout
  in training mode is not replayed (new masks would not be the step's): its parameters are
  skipped with that reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch.stats.module_outputs import first_tensor

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_warned: set[str] = set()


@dataclass
class Call:
    """One call of a module: its inputs, and the signal ∂L/∂y at its (first) output (while the
    step runs, where `Capture.keep_signal` keeps it). A call recorded inside
    `nn.MultiheadAttention` (`captured_attention.py`) is one of its linear maps, `batch_first`
    (its input; its signal once `Capture.resolve` has turned it), with the weight `rows` it used
    (None: all)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signal: Any = None
    rows: tuple[int, int] | None = None
    batch_first: bool = False


Rule = Callable[[nn.Module, list[Call]], dict[str, Tensor]]


def rule_for(module: nn.Module, calls: list[Call]) -> Rule | None:
    """The registry: the ghost-norm rule for the module's kind, or None (use the fallback)."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _linear
    if (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _conv
    if (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return _embedding
    if isinstance(module, nn.MultiheadAttention) and calls and calls[0].batch_first:
        return _in_projection
    if isinstance(module, _NORMS):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            warn_once(
                f"batchnorm:{id(module)}",
                f"gradwatch: {type(module).__name__} in training mode normalises with the "
                "batch's statistics, which couple the examples: its per-example gradient norms "
                "treat those statistics as constants (use eval mode for exact ones)",
            )
        return _norm
    return None


def _linear(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    return linear_squares(calls, bias=module.bias is not None)


def linear_squares(calls: list[Call], *, bias: bool) -> dict[str, Tensor]:
    """{"weight"[, "bias"]: [B]} of one linear map from its calls (input, output signal)."""
    a = _joined([as_sequence(c.args[0]) for c in calls], dim=1)
    g = _joined([as_sequence(c.signal) for c in calls], dim=1)
    out = {"weight": _outer_squares(a, g)}
    if bias:
        out["bias"] = g.float().sum(dim=1).square().sum(dim=1)
    return out


def _in_projection(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    """The in-projection's weight and bias from its recorded pieces: calls on one range of
    weight rows are one linear map used several times (their terms join); distinct ranges are
    disjoint parts of the weight (their squares add)."""
    ranges: dict[tuple[int, int] | None, list[Call]] = {}
    for call in calls:
        ranges.setdefault(call.rows, []).append(call)
    squares: dict[str, Tensor] = {}
    for pieces in ranges.values():
        for local, value in linear_squares(pieces, bias=module.in_proj_bias is not None).items():
            name = f"in_proj_{local}"
            squares[name] = squares[name] + value if name in squares else value
    return squares


def _conv(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    """Conv1d/Conv2d as a 2-d convolution (Conv1d with height 1). With L output positions, the
    Gram matrices of the unfolded patches when L² ≤ C_in·k·C_out; else each example's weight
    gradient, from one grouped weight-gradient convolution with the examples as groups (no
    unfolded copy of the input: three times faster than unfold and a batched product on the
    CNN benchmark's middle layer)."""
    inputs, signals = [], []
    for call in calls:
        x, g = call.args[0], call.signal
        if isinstance(module, nn.Conv1d):
            x, g = x.unsqueeze(2), g.unsqueeze(2)
        inputs.append(x)
        signals.append(g)
    if isinstance(module, nn.Conv1d):
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    positions = sum(g[0, 0].numel() for g in signals)
    d_in, d_out = module.in_channels * kernel[0] * kernel[1], module.out_channels
    flat = _joined([g.flatten(2).transpose(1, 2) for g in signals], dim=1)  # [B, L, C_out]
    out = {}
    if positions * positions <= d_in * d_out:
        patches = [
            F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
            for x in inputs
        ]
        out["weight"] = _outer_squares(_joined(patches, dim=1), flat)
    else:
        grads = 0
        for x, g in zip(inputs, signals, strict=True):
            batch = x.shape[0]
            grads = grads + torch.nn.grad.conv2d_weight(
                x.float().reshape(1, batch * x.shape[1], *x.shape[2:]),
                (batch * d_out, module.in_channels, *kernel),
                g.float().reshape(1, batch * d_out, *g.shape[2:]),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=batch,
            )
        out["weight"] = grads.reshape(inputs[0].shape[0], -1).square().sum(dim=1)
    if module.bias is not None:
        out["bias"] = flat.float().sum(dim=1).square().sum(dim=1)
    return out


def carries_batch(call: Call, batch: int) -> bool:
    """Whether a call's first input and its signal hold the batch on axis 0."""
    signal = call.signal
    return call.args[0].shape[0] == batch and signal is not None and signal.shape[0] == batch


def _embedding(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    tokens = torch.cat([c.args[0].reshape(c.args[0].shape[0], -1) for c in calls], dim=1)
    width = module.embedding_dim
    g = torch.cat([c.signal.reshape(c.signal.shape[0], -1, width) for c in calls], dim=1).float()
    same = tokens[:, :, None] == tokens[:, None, :]
    if module.padding_idx is not None:
        counted = tokens != module.padding_idx
        same = same & counted[:, :, None] & counted[:, None, :]
    gram = torch.bmm(g, g.transpose(1, 2))
    return {"weight": (gram * same).sum(dim=(1, 2)).clamp_min(0)}


def _norm(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    weight = bias = 0
    for call in calls:
        x, g = call.args[0].float(), call.signal.float()
        normalised, channel_dims = _normalised(module, x)
        others = tuple(d for d in range(x.dim()) if d not in channel_dims and d != 0)
        # (sum over an empty tuple of axes would reduce every axis)
        weight = weight + ((g * normalised).sum(dim=others) if others else g * normalised)
        bias = bias + (g.sum(dim=others) if others else g)
    out = {}
    if getattr(module, "weight", None) is not None and module.weight.requires_grad:
        out["weight"] = weight.flatten(1).square().sum(dim=1)
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        out["bias"] = bias.flatten(1).square().sum(dim=1)
    return out


def _normalised(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(x̂, the axes the affine parameters span) of a normalisation layer's input."""
    if isinstance(module, nn.LayerNorm) or (
        hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)
    ):
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        if isinstance(module, nn.LayerNorm):
            var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + module.eps), dims
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps), dims
    if isinstance(module, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=2, keepdim=True, unbiased=False)
        return ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(x.shape), (1,)
    # BatchNorm: running statistics in eval mode, the batch's in training mode.
    shape = [1, -1] + [1] * (x.dim() - 2)
    if module.training or module.running_mean is None:
        dims = tuple(d for d in range(x.dim()) if d != 1)
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
    else:
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + module.eps), (1,)


def _outer_squares(a: Tensor, g: Tensor) -> Tensor:
    """‖Σ_t g_t a_tᵀ‖² per example for a [B, T, d_in], g [B, T, d_out] (views are fine: the
    batched matrix products read transposed layouts as they are): from the [B, T, T] Gram
    matrices when T² ≤ d_in·d_out, else from the materialised [B, d_out, d_in]."""
    a, g = a.float(), g.float()
    steps, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if steps == 1:
        return a.square().sum(dim=(1, 2)) * g.square().sum(dim=(1, 2))
    if steps * steps <= d_in * d_out:
        gram = torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
        return gram.sum(dim=(1, 2)).clamp_min(0)
    per_example = torch.bmm(g.transpose(1, 2), a)
    return torch.linalg.vector_norm(per_example, dim=(1, 2)).square()


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    """The calls' tensors joined along `dim` (the one call's tensor itself, without a copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def fallback_squares(
    module: nn.Module,
    name: str,
    calls: list[Call],
    batch: int,
    batch_dim: int,
    params: dict[str, nn.Parameter],
) -> dict[str, Tensor]:
    """Per-example squared norms of `params` (named relative to `module`: its own and those of
    descendants it uses without calling them) by each example's vector-Jacobian product of the
    module alone, with its captured signal as the cotangent."""
    from torch.func import functional_call, vjp, vmap

    warn_once(
        f"fallback:{type(module).__name__}",
        f"gradwatch: no ghost-norm rule for {type(module).__name__} ({name!r}): its per-example "
        "gradients come from torch.func, one vector-Jacobian product of the module per example "
        "(they are materialised)",
    )
    detached = {n: p.detach() for n, p in params.items()}
    sums: dict[str, Tensor] = {}
    for call in calls:
        tensors, axes, rebuild = _batched_leaves(call, batch, batch_dim)

        def one(*example: Tensor, axes: list[int] = axes, rebuild: Any = rebuild) -> Any:
            *leaves, signal = [t.unsqueeze(a) for t, a in zip(example, axes, strict=True)]
            args, kwargs = rebuild(leaves)

            def forward(p: dict[str, Tensor]) -> Tensor:
                out = functional_call(module, p, args, kwargs)
                return out if isinstance(out, Tensor) else first_tensor(out)

            return vjp(forward, detached)[1](signal)[0]

        try:
            grads = vmap(one, in_dims=tuple(axes))(*tensors)
        except Exception:  # vmap cannot run the module (nn.LSTM): one example at a time
            rows = [
                one(*(t.select(a, i) for t, a in zip(tensors, axes, strict=True)))
                for i in range(batch)
            ]
            grads = {n: torch.stack([r[n] for r in rows]) for n in detached}
        for n, g in grads.items():
            sums[n] = g if n not in sums else sums[n] + g
    return {n: g.flatten(1).float().square().sum(dim=1) for n, g in sums.items()}


def _batched_leaves(
    call: Call, batch: int, batch_dim: int
) -> tuple[
    list[Tensor], list[int], Callable[[list[Tensor]], tuple[tuple[Any, ...], dict[str, Any]]]
]:
    """The call's batched tensors (args, kwargs, then the signal), the axis of each, and a
    function that puts example tensors back into (args, kwargs)."""
    args, kwargs = list(call.args), dict(call.kwargs)
    places: list[tuple[str, Any]] = []
    tensors, axes = [], []
    for where, items in (("arg", enumerate(args)), ("kwarg", kwargs.items())):
        for key, value in items:
            axis = batch_axis(value, batch, batch_dim)
            if axis is not None:
                places.append((where, key))
                tensors.append(value)
                axes.append(axis)
    signal_axis = batch_axis(call.signal, batch, batch_dim)
    if signal_axis is None:
        raise ValueError("the module's output has no batch axis")
    tensors.append(call.signal)
    axes.append(signal_axis)

    def rebuild(leaves: list[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        new_args, new_kwargs = list(args), dict(kwargs)
        for (where, key), leaf in zip(places, leaves, strict=True):
            if where == "arg":
                new_args[key] = leaf
            else:
                new_kwargs[key] = leaf
        return tuple(new_args), new_kwargs

    return tensors, axes, rebuild


def random_in_training(module: nn.Module) -> str | None:
    """What in `module` draws random numbers in training mode (dropout with p > 0), or None: a
    replay of such a module does not reproduce the step."""
    for inner in module.modules():
        if not inner.training:
            continue
        if isinstance(inner, nn.modules.dropout._DropoutNd) and inner.p > 0:
            return f"{type(inner).__name__}(p={inner.p})"
        if isinstance(inner, nn.MultiheadAttention) and inner.dropout > 0:
            return f"attention dropout (p={inner.dropout})"
    return None


def batch_axis(value: Any, batch: int, batch_dim: int) -> int | None:
    """The batch axis of a tensor argument: `batch_dim` if it has the batch's size there, else
    0 if it has it there (a key_padding_mask is [B, S] whatever the layout), else None."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return None
    if value.dim() > batch_dim and value.shape[batch_dim] == batch:
        return batch_dim
    return 0 if value.shape[0] == batch else None


def as_sequence(t: Tensor) -> Tensor:
    """[B, ..., d] as [B, T, d]."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
