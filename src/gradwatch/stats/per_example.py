"""Per-example gradient norms from one ordinary backward, without materialising per-example
gradients where an identity allows ("ghost norms").

Example i's gradient is ∇ℓ_i: with the batch loss L = mean_i ℓ_i it is B × example i's
contribution to ∇L (the contribution itself with `reduction="sum"`), so a masked or padded
sequence loss counts what it counts. The contribution of a layer's parameters comes from the
layer's input a and the backpropagated signal g = ∂L/∂y at its output, both captured by hooks
(`Capture`) during one forward and one backward, and turned into per-example squared norms by
the rules of `ghost_norms.py` (Linear, Conv, Embedding, normalisation layers, and
`nn.MultiheadAttention`, whose inner linear maps `captured_attention.py` exposes; a torch.func
fallback for every other module that owns parameters, such as `nn.LSTM` or a positional
embedding owned by the root). Everything comes from the step's own forward and backward, so
dropout counts with the step's masks; only the fallback replays a module, and it refuses one
that draws random numbers.

`per_example_grad_norms` is the direct API; `ExampleProbes` does the same on the probe steps of
`gw.watch(..., per_example=...)`, where the noise scale (`noise_scale.py`) is updated too.

A module called several times in one forward (weight tying, a cell over time) contributes the
sum of its calls. A parameter the loss does not depend on has norm 0 for every example. One that
no rule reaches (used without calling its module, by a module that owns no parameter) is listed
in `skipped` with the reason, and `total` is then NaN: never a total that silently leaves a
parameter out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.stats.example_capture import Capture
from gradwatch.stats.ghost_norms import (
    Call,
    batch_axis,
    carries_batch,
    fallback_squares,
    random_in_training,
    rule_for,
)

UNREACHED = (
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
    capture.resolve(capture.passes)
    calls = capture.passes[0] if capture.passes else {}
    squares, skipped = example_squares(model, calls, batch, batch_dim)
    device = next(iter(params.values())).device
    for name, batch_grad in zip(params, batch_grads, strict=True):
        if batch_grad is None:  # the loss does not depend on it: no example's gradient does
            squares[name] = torch.zeros(batch, device=device)
            skipped.pop(name, None)
        elif name not in squares and name not in skipped:
            skipped[name] = UNREACHED
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
        rule = rule_for(module, reached)
        if rule is not None:
            if batch_dim != 0:
                reached = [
                    c if c.batch_first else _batch_first(c, batch, batch_dim) for c in reached
                ]
            if any(not carries_batch(c, batch) for c in reached):
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
        random = random_in_training(module)
        if random is not None:
            reason = (
                f"{type(module).__name__} has no rule, and the torch.func fallback would replay "
                f"its {random} in training mode with new random masks (not the step's): put "
                "the model in eval mode or set that dropout to 0 for per-example norms"
            )
            skipped.update({f"{prefix}{n}": reason for n in local})
            continue
        try:
            found = fallback_squares(module, name, reached, batch, batch_dim, local)
        except Exception as exc:  # a module torch.func cannot handle: say so, never guess
            reason = f"{type(module).__name__} has no rule and its fallback failed: {exc}"
            skipped.update({f"{prefix}{n}": reason for n in local})
            continue
        squares.update({f"{prefix}{n}": value for n, value in found.items()})
    return squares, skipped


def _batch_first(call: Call, batch: int, batch_dim: int) -> Call:
    """The call with the batch axis of its first input and its signal moved to the front."""
    x = call.args[0]
    moved = x.movedim(batch_dim, 0) if batch_axis(x, batch, batch_dim) == batch_dim else x
    signal = call.signal
    if signal is not None and batch_axis(signal, batch, batch_dim) == batch_dim:
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


def _batch_size(inputs: Sequence[Any], batch_dim: int) -> int:
    for value in inputs:
        if isinstance(value, Tensor) and value.dim() > batch_dim:
            return value.shape[batch_dim]
    raise ValueError(
        f"per_example_grad_norms needs a tensor input with a batch axis {batch_dim} "
        "(pass the batch as *inputs, and batch_dim if the batch is not the first axis)"
    )
