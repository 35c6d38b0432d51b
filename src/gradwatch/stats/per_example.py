"""Per-example gradient norms from one ordinary backward, without materialising per-example
gradients where an identity allows ("ghost norms").

Example i's gradient is ∇ℓ_i: with the batch loss L = mean_i ℓ_i it is B × example i's
contribution to ∇L (the contribution itself with `reduction="sum"`), so a masked or padded
sequence loss counts what it counts. The contribution of a layer's parameters comes from the
layer's input a and the backpropagated signal g = ∂L/∂y at its output, both captured by hooks
during one forward and one backward; per module kind (a registry, as BackPACK keeps one):

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
- Anything else that owns parameters (`nn.MultiheadAttention`, whose `out_proj` weight is used
  without calling the Linear, a custom module, a learned positional embedding owned by the root
  module): `torch.func` computes each example's vector-Jacobian product of that module alone with
  its captured signal (vmap over the examples; an example-by-example loop where vmap cannot run,
  as for `nn.LSTM`). It costs a per-example backward of that module and materialises its
  per-example gradients; a warning names the module once.

A module called several times in one forward (weight tying, a cell over time) contributes the
sum of its calls. A parameter the loss does not depend on has norm 0 for every example. One that
no rule reaches (used without calling its module, by a module that owns no parameter) is listed
in `skipped` with the reason, and `total` is then NaN: never a total that silently leaves a
parameter out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch.stats.noise_scale import NoiseScale

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_warned: set[str] = set()
_UNREACHED = (
    "it is used outside a forward call of its module, by a module that owns no parameter of "
    "its own (gradwatch captures those that do)"
)


@dataclass(frozen=True)
class PerExampleNorms:
    """Per-example gradient norms ‖∇ℓ_i‖₂: `total` [B] over every trainable parameter,
    `per_tensor` {parameter name: [B]}, and `skipped` {parameter name: reason} for those no rule
    reached (then `total` is NaN)."""

    total: Tensor
    per_tensor: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    """One call of a module: its inputs, and the signal ∂L/∂y at its (first) output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signal: Tensor | None = None


class Capture:
    """Hooks that record each call of the modules owning trainable parameters and the signal
    at each call's output, grouped by forward pass of the model (`passes`); `remove()` takes
    them off. Records only while `active` (the watcher sets it on probe steps)."""

    def __init__(self, model: nn.Module) -> None:
        self.passes: list[dict[str, list[Call]]] = []
        self.active = True
        self._handles: list[Any] = [model.register_forward_pre_hook(self._new_pass)]
        for name, module in model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(
                    module.register_forward_hook(self._record(name), with_kwargs=True)
                )

    def _new_pass(self, module: nn.Module, args: Any) -> None:
        if self.active and torch.is_grad_enabled():
            self.passes.append({})

    def _record(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not self.active or not torch.is_grad_enabled() or not self.passes:
                return
            call = Call(_detached(args), _detached(kwargs))
            self.passes[-1].setdefault(name, []).append(call)
            y = output if isinstance(output, Tensor) else _first_tensor(output)
            if y is not None and y.requires_grad:

                def keep(grad: Tensor) -> None:
                    call.signal = grad if call.signal is None else call.signal + grad

                y.register_hook(keep)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def per_example_grad_norms(
    model: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    *inputs: Any,
    batch_dim: int = 0,
    reduction: str = "mean",
) -> PerExampleNorms:
    """The gradient norm of each example of a batch, from one forward and one backward.

    The loss is `loss_fn(model(*inputs))`, a scalar: the mean over the batch of the examples'
    losses ℓ_i (`reduction="sum"`: their sum); example i's gradient is ∇ℓ_i. `batch_dim` is the
    batch axis of the inputs (and of the activations). The model is left as it was found: its
    `.grad`s (the backward uses `torch.autograd.grad`), its buffers (BatchNorm running
    statistics are restored), no hook remains. Syncs with the host only where a per-example
    fallback loops over the examples.

    Returns:
        `PerExampleNorms`: `.total` [B], `.per_tensor` {name: [B]}, `.skipped` {name: reason}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    batch = _batch_size(inputs, batch_dim)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameter: nothing has a gradient")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    capture = Capture(model)
    try:
        loss = loss_fn(model(*inputs))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return a scalar tensor (the batch's mean or summed loss), got "
                f"{loss!r:.80}"
            )
        batch_grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        capture.remove()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    scale = float(batch) if reduction == "mean" else 1.0
    calls = capture.passes[0] if capture.passes else {}
    squares, skipped = example_squares(model, calls, batch, batch_dim)
    device = next(iter(params.values())).device
    for name, batch_grad in zip(params, batch_grads, strict=True):
        if batch_grad is None:  # the loss does not depend on it: no example's gradient does
            squares[name] = torch.zeros(batch, device=device)
            skipped.pop(name, None)
        elif name not in squares and name not in skipped:
            skipped[name] = _UNREACHED
    per_tensor = {n: squares[n].sqrt() * scale for n in params if n in squares}
    if skipped:
        total = torch.full((batch,), torch.nan, device=device)
    else:
        total = torch.stack([squares[n] for n in params]).sum(dim=0).sqrt() * scale
    return PerExampleNorms(total, per_tensor, skipped)


def example_squares(
    model: nn.Module, calls: dict[str, list[Call]], batch: int, batch_dim: int
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Per parameter name, Σ_i-wise squared norms [B] of the example contributions, from the
    captured calls; and the parameters skipped, with the reason."""
    modules = dict(model.named_modules())
    squares: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    uncalled = _uncalled_descendants(model, calls)
    for name, module_calls in calls.items():
        module = modules[name]
        prefix = f"{name}." if name else ""
        own = {
            f"{prefix}{n}": p for n, p in module.named_parameters(recurse=False) if p.requires_grad
        }
        reached = [c for c in module_calls if c.signal is not None]
        if not reached:
            skipped.update(dict.fromkeys(own, "its module's output did not reach the loss"))
            continue
        rule = _rule(module, reached)
        if rule is not None:
            if batch_dim != 0:
                reached = [_batch_first(c, batch, batch_dim) for c in reached]
            if any(c.args[0].shape[0] != batch or c.signal.shape[0] != batch for c in reached):
                reason = (
                    f"the input of {name!r} does not carry the batch's {batch} examples on "
                    f"axis {batch_dim} (e.g. the batch was flattened with another axis)"
                )
                skipped.update(dict.fromkeys(own, reason))
                continue
            for local, value in rule(module, reached).items():
                squares[f"{prefix}{local}"] = value
            continue
        local = {
            **{n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad},
            **uncalled.get(name, {}),
        }
        try:
            found = _fallback(module, name, reached, batch, batch_dim, local)
        except Exception as exc:  # a module torch.func cannot handle: say so, never guess
            reason = f"{type(module).__name__} has no rule and its fallback failed: {exc}"
            skipped.update({f"{prefix}{n}": reason for n in local})
            continue
        squares.update({f"{prefix}{n}": value for n, value in found.items()})
    return squares, skipped


Rule = Callable[[nn.Module, list[Call]], dict[str, Tensor]]


def _rule(module: nn.Module, calls: list[Call]) -> Rule | None:
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
    if isinstance(module, _NORMS):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            _warn_once(
                f"batchnorm:{id(module)}",
                f"gradwatch: {type(module).__name__} in training mode normalises with the "
                "batch's statistics, which couple the examples: its per-example gradient norms "
                "treat those statistics as constants (use eval mode for exact ones)",
            )
        return _norm
    return None


def _linear(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    a = _joined([_as_sequence(c.args[0]) for c in calls], dim=1)
    g = _joined([_as_sequence(c.signal) for c in calls], dim=1)
    out = {"weight": _outer_squares(a, g)}
    if module.bias is not None:
        out["bias"] = g.sum(dim=1).square().sum(dim=1)
    return out


def _conv(module: nn.Module, calls: list[Call]) -> dict[str, Tensor]:
    patches, signals = [], []
    for call in calls:
        x, g = call.args[0], call.signal
        if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height 1
            x, g = x.unsqueeze(2), g.unsqueeze(2)
            kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
            padding, stride = (0, *module.padding), (1, *module.stride)
        else:
            kernel, dilation = module.kernel_size, module.dilation
            padding, stride = module.padding, module.stride
        unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        patches.append(unfolded.transpose(1, 2))  # [B, L, C_in·k], a view
        signals.append(g.flatten(2).transpose(1, 2))  # [B, L, C_out], a view
    a, g = _joined(patches, dim=1), _joined(signals, dim=1)
    out = {"weight": _outer_squares(a, g)}
    if module.bias is not None:
        out["bias"] = g.sum(dim=1).square().sum(dim=1)
    return out


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


def _fallback(
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

    _warn_once(
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
                return out if isinstance(out, Tensor) else _first_tensor(out)

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
            axis = _batch_axis(value, batch, batch_dim)
            if axis is not None:
                places.append((where, key))
                tensors.append(value)
                axes.append(axis)
    signal_axis = _batch_axis(call.signal, batch, batch_dim)
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


def _batch_axis(value: Any, batch: int, batch_dim: int) -> int | None:
    """The batch axis of a tensor argument: `batch_dim` if it has the batch's size there, else
    0 if it has it there (a key_padding_mask is [B, S] whatever the layout), else None."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return None
    if value.dim() > batch_dim and value.shape[batch_dim] == batch:
        return batch_dim
    return 0 if value.shape[0] == batch else None


def _batch_first(call: Call, batch: int, batch_dim: int) -> Call:
    """The call with the batch axis of its first input and its signal moved to the front."""
    x = call.args[0]
    moved = x.movedim(batch_dim, 0) if _batch_axis(x, batch, batch_dim) == batch_dim else x
    signal = call.signal
    if signal is not None and _batch_axis(signal, batch, batch_dim) == batch_dim:
        signal = signal.movedim(batch_dim, 0)
    return Call((moved, *call.args[1:]), call.kwargs, signal)


def _uncalled_descendants(
    model: nn.Module, calls: dict[str, list[Call]]
) -> dict[str, dict[str, nn.Parameter]]:
    """Trainable parameters of modules never called, under their nearest called ancestor (the
    module that uses them, as `nn.MultiheadAttention` uses `out_proj.weight`), named relative
    to it."""
    found: dict[str, dict[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own or name in calls:
            continue
        parts = name.split(".") if name else []
        for cut in range(len(parts) - 1, -1, -1):
            ancestor = ".".join(parts[:cut])
            if ancestor in calls:
                relative = ".".join(parts[cut:])
                found.setdefault(ancestor, {}).update(
                    {f"{relative}.{n}": p for n, p in own.items()}
                )
                break
    return found


def _as_sequence(t: Tensor) -> Tensor:
    """[B, ..., d] as [B, T, d]."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in map(_first_tensor, output) if t is not None), None)
    return None


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _batch_size(inputs: Sequence[Any], batch_dim: int) -> int:
    for value in inputs:
        if isinstance(value, Tensor) and value.dim() > batch_dim:
            return value.shape[batch_dim]
    raise ValueError(
        f"per_example_grad_norms needs a tensor input with a batch axis {batch_dim} "
        "(pass the batch as *inputs, and batch_dim if the batch is not the first axis)"
    )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class ExampleProbes:
    """Per-example gradient norms on probe steps, for `gw.watch(..., per_example=...)`.

    The hooks record the probe step's forward passes (one per micro-batch under gradient
    accumulation: each pass holds other examples); `record` turns them into per-example norms
    once the step's gradients exist. Example i's gradient is ∇ℓ_i with `reduction="mean"`: each
    pass's loss the mean over its B_k examples, divided by the K passes of the step (the usual
    accumulation), so ∇ℓ_i = K·B_k × its contribution; with `"sum"` the contribution itself.
    Batch axis 0. Costs the per-example computation of every module on probe steps (see the
    module docstring); no host sync except where a fallback loops over examples.
    """

    def __init__(self, model: nn.Module, names: list[str], reduction: str) -> None:
        self.model = model
        self.names = names
        self.reduction = reduction
        self.noise = NoiseScale()
        self._capture: Capture | None = None
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        if self._capture is not None:
            self._capture.active = value

    def attach(self) -> None:
        self._capture = Capture(self.model)
        self._capture.active = self._active

    def detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture.passes.clear()
            self._capture = None

    def record(self, device: torch.device) -> ExampleStatistics | None:
        """The step's per-example statistics from the recorded passes (then forgotten); None when
        no pass was recorded."""
        if self._capture is None or not self._capture.passes:
            return None
        passes, self._capture.passes = self._capture.passes, []
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
                    skipped.setdefault(name, missed.get(name, _UNREACHED))
            parts.append(part)
        if not parts:
            return None
        per_tensor = {
            n: torch.cat([p[n] for p in parts]) for n in self.names if all(n in p for p in parts)
        }
        return ExampleStatistics(per_tensor, skipped, self.names)


@dataclass
class ExampleStatistics:
    """One probe step's per-example squared norms {tensor: [N]} and what was skipped."""

    squares: dict[str, Tensor]
    skipped: dict[str, str]
    names: list[str]

    def quantiles(self) -> Tensor:
        """[tensors, 3]: p50, p95 and max of each tensor's per-example norms (NaN if skipped)."""
        rows = []
        probs = None
        for name in self.names:
            squares = self.squares.get(name)
            if squares is None:
                rows.append(None)
                continue
            if probs is None:
                probs = torch.tensor([0.5, 0.95], device=squares.device)
            norms = squares.sqrt()
            rows.append(torch.cat([torch.quantile(norms, probs), norms.max().reshape(1)]))
        device = next((r.device for r in rows if r is not None), torch.device("cpu"))
        nan = torch.full((3,), torch.nan, device=device)
        return torch.stack([nan if r is None else r for r in rows])

    def totals(self) -> Tensor:
        """[N] per-example squared norms over every tensor; NaN if a tensor was skipped."""
        values = list(self.squares.values())
        total = torch.stack(values).sum(dim=0)
        return total if not self.skipped else torch.full_like(total, torch.nan)


def _pass_batch(calls: dict[str, list[Call]]) -> int | None:
    """The batch size of one forward pass: axis 0 of its first captured input."""
    for module_calls in calls.values():
        for call in module_calls:
            first = next((a for a in call.args if isinstance(a, Tensor) and a.dim()), None)
            if first is not None:
                return first.shape[0]
    return None
