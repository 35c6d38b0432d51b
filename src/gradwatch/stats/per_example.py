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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.stats.captured_attention import capturable, swap_in, swap_out
from gradwatch.stats.device import constant
from gradwatch.stats.flow import first_tensor
from gradwatch.stats.ghost_norms import (
    Call,
    batch_axis,
    carries_batch,
    fallback_squares,
    random_in_training,
    rule_for,
)
from gradwatch.stats.hooks import Shield, unshielded
from gradwatch.stats.noise_scale import NoiseScale

# The scalars a probe step with per_example records (besides `NOISE_SCALARS`).
EXAMPLE_SCALARS: tuple[str, ...] = (
    "pe_examples",
    "pe_total_p50",
    "pe_total_max",
    "pe_total_argmax",
    "pe_top_share",
)
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


class Capture:
    """Hooks that record each call of the modules owning trainable parameters and the signal
    at each call's output, grouped by forward pass of the model (`passes`); `remove()` takes
    them off. Records only while `active` (the watcher sets it on probe steps)."""

    def __init__(self, model: nn.Module, *, shield: Shield = unshielded) -> None:
        self.passes: list[dict[str, list[Call]]] = []
        self.active = True
        self._add_into = shield(_add_into)
        self._add_span = shield(self._add_workspace)
        self._workspace = torch.zeros(0)
        self._needed = 0
        # The step's state lives in lists that only grow (a compiled forward loses attribute
        # stores made by its hooks): where each kept signal ends, and what found no room.
        self._ends: list[int] = []
        self._left_out: list[str] = []
        self._handles: list[Any] = [model.register_forward_pre_hook(shield(self._new_pass))]
        self._swapped: list[nn.Module] = []
        inside: tuple[str, ...] = ()  # the names under a swapped module: it records them
        for name, module in model.named_modules():
            if name.startswith(inside):
                continue
            if capturable(module):  # records its linear maps itself: no hooks in it
                swap_in(module, self, name)
                self._swapped.append(module)
                inside = (*inside, f"{name}.")
            elif any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(
                    module.register_forward_hook(shield(self._record(name)), with_kwargs=True)
                )

    def reserve(self, device: torch.device) -> None:
        """Before a step it records: room for the signals of the largest step seen, zeroed."""
        self._needed = max(self._needed, self._ends[-1] if self._ends else 0)
        if self._needed > self._workspace.numel() or self._workspace.device != device:
            self._workspace = torch.zeros(self._needed, device=device)
        else:
            self._workspace.zero_()
        self._ends.clear()
        self._left_out.clear()

    @property
    def incomplete(self) -> bool:
        """Whether a signal of the step found no room in a compiled forward (`keep_signal`)."""
        return bool(self._left_out)

    def keep_signal(self, y: Tensor) -> Tensor | tuple[int, int, tuple[int, ...]] | None:
        """Where the step's backward puts the signal at y (float32): a span (start, stop, shape)
        of the workspace, read with `signal` once the backward is done; or a buffer of its own.

        The workspace is kept between steps (`reserve`) and filled in place by a tensor hook that
        slices it itself: in a compiled forward a hook cannot write into a tensor the graph made,
        nor into a view of the workspace the graph returns (aot_autograd fails), nor rebind an
        attribute (dynamo breaks the graph). Where the workspace is too small (the first step, or
        a larger batch): eagerly a buffer of its own; in a compiled forward None, and the step is
        `incomplete` (left out; `reserve` makes room for the next). Between `reserve`s the
        signals take consecutive spans: every pass of a step (gradient accumulation) has room."""
        start = self._ends[-1] if self._ends else 0
        stop = start + y.numel()
        self._ends.append(stop)
        if stop <= self._workspace.numel() and y.device == self._workspace.device:
            y.register_hook(functools.partial(self._add_span, start, stop))
            return start, stop, tuple(y.shape)
        if torch.compiler.is_compiling():
            self._left_out.append("no room")
            return None
        signal = torch.zeros(y.shape, device=y.device)
        y.register_hook(functools.partial(self._add_into, signal))
        return signal

    def resolve(self, passes: list[dict[str, list[Call]]]) -> None:
        """After the backward: each call's signal as a tensor, batch first."""
        for calls in passes:
            for call in (c for module_calls in calls.values() for c in module_calls):
                kept = call.signal
                if isinstance(kept, tuple):
                    start, stop, shape = kept
                    kept = self._workspace[start:stop].view(shape)
                if kept is not None and call.batch_first:  # nn.MultiheadAttention's [L, B, ...]
                    kept = kept.transpose(0, 1)
                call.signal = kept

    def _add_workspace(self, start: int, stop: int, grad: Tensor) -> None:
        # the hook reads the workspace itself: a view made in the forward is no hook's to fill
        self._workspace[start:stop].add_(grad.reshape(-1))

    def _new_pass(self, module: nn.Module, args: Any) -> None:
        if self.active and torch.is_grad_enabled():
            self.passes.append({})

    def _record(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not self.active or not torch.is_grad_enabled() or not self.passes:
                return
            y = output if isinstance(output, Tensor) else first_tensor(output)
            signal = None
            if y is not None and y.requires_grad:
                signal = self.keep_signal(y)
                if signal is None:
                    return
            self.passes[-1].setdefault(name, []).append(
                Call(_detached(args), _detached(kwargs), signal)
            )

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._swapped:
            swap_out(module, self)
        self._swapped.clear()


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


def _add_into(buffer: Tensor, grad: Tensor) -> None:
    buffer.add_(grad)


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

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        reduction: str,
        device: torch.device,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self.model = model
        self.shield = shield
        self.names = names
        self.reduction = reduction
        self.device = device
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
            if value:
                self._capture.reserve(self.device)
            self._capture.active = value

    def attach(self) -> None:
        self._capture = Capture(self.model, shield=self.shield)
        self._capture.active = self._active

    def detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture.passes.clear()
            self._capture = None

    def record(self) -> ExampleStatistics | None:
        """The step's per-example statistics from the recorded passes (then forgotten); None when
        no pass was recorded, or a compiled forward could not record them all (`Capture`)."""
        if self._capture is None or not self._capture.passes:
            return None
        passes, self._capture.passes = self._capture.passes, []
        if self._capture.incomplete:
            return None
        self._capture.resolve(passes)
        self._capture.active = False  # the fallback re-runs modules: not a pass to record
        try:
            return self._statistics(passes, self.device)
        finally:
            self._capture.active = self._active

    def _statistics(
        self, passes: list[dict[str, list[Call]]], device: torch.device
    ) -> ExampleStatistics | None:
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
                probs = constant((0.5, 0.95), squares.device, squares.dtype)
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
