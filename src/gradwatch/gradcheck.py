"""`gw.gradcheck`: check a model's backpropagation against finite differences and name the module
whose backward is wrong.

The check runs on a float64 deep copy, so the user's model keeps its dtype, mode, weights, `.grad`
and hooks. Every forward pass is made under the same forked and seeded RNG, so dropout draws the
same masks in every evaluation and train-mode models check correctly.

- Parameter check, per parameter tensor p: for a random unit direction v, the directional derivative
  <∂L/∂p, v> from autograd against the central difference (L(p + εv) − L(p − εv)) / 2ε.
- Module check, per module m, on the inputs x it received in the model's forward pass (positional,
  keyword, tuples): for random u over its floating inputs and its parameters, and random g over its
  outputs, <VJP_m(g), u> from autograd against <g, m(x + εu) − m(x − εu)> / 2ε.

Semantics the check respects: an `nn.Embedding`/`nn.EmbeddingBag` row at `padding_idx` gets no
gradient by design, so directions leave it out (and the report notes it). Inputs a module received
are kept as detached snapshots (tensors inside caches and other objects too), and every evaluation
gets a fresh copy, so state that a forward appends to (a Hugging Face KV cache) starts each
evaluation as it was in the model's forward. A row that cannot be evaluated is `inconclusive`
with the reason: `gradcheck` raises only for bad arguments or a model whose forward fails.

Rows disagreeing beyond tolerance are `mismatch`; the culprits are the innermost modules with a
mismatch (a module whose children all agree but which disagrees holds the wrong backward itself).
A disagreeing row is `inconclusive`, never `mismatch`, when the difference is dominated by rounding
(the slopes at steps ε and ε/1000 disagree: the function moves by whole rounding steps, as after a
cast to lower precision inside), or when the two one-sided slopes differ from each other and keep
their values at both steps (a kink: ReLU at 0, max, abs, sort).

Cost: one forward and backward of the model, 2 forward passes per parameter tensor, and one
forward-backward plus 2 forward passes of each module: it grows with the number of tensors and
modules, not with the number of parameters. `report.evaluations` counts the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.errors import InputError
from gradwatch.gradcheck_math import Settings, compare, random_like, unit_direction, value_along
from gradwatch.gradcheck_report import GradcheckReport, GradcheckRow
from gradwatch.structures import copy_model, floating_tensors, map_floating, snapshot


class _Evaluator:
    """Runs forward passes under one fixed RNG state and counts them."""

    def __init__(self, seed: int, devices: list[torch.device]) -> None:
        self.seed = seed
        self.devices = [d for d in devices if d.type == "cuda"]
        self.count = 0

    def __call__(self, fn: Callable[[], Any]) -> Any:
        self.count += 1
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            return fn()


def _padding_rows(model: nn.Module) -> dict[int, int]:
    """id(weight) -> padding_idx of the embeddings whose padding row gets no gradient."""
    return {
        id(m.weight): m.padding_idx
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None
    }


# Values a snapshot shares instead of copying: immutable, or not the caller's to copy.
def _projection_loss(output: Any, seed: int) -> Tensor:
    """Default loss: <output, R> for a fixed random R per floating output tensor."""
    generator = torch.Generator().manual_seed(seed + 1)
    terms = [
        (t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum()
        for t in floating_tensors(output)
    ]
    if not terms:
        raise InputError("the model's output holds no floating-point tensor to differentiate")
    return torch.stack(terms).sum()


def gradcheck(
    model: nn.Module,
    inputs: Tensor | tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    seed: int = 0,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-10,
) -> GradcheckReport:
    """Check `model`'s backward against finite differences; name the module that is wrong.

    Args:
        model: the model; it is not modified (the check runs on a float64 deep copy).
        inputs: a tensor, or a tuple passed as `model(*inputs)`.
        loss_fn: `loss_fn(output) -> scalar`. Default: a fixed random projection of the output,
            <output, R> with R ~ N(0, 1) seeded by `seed` (a sum or a norm can hide errors, and
            normalization layers make them flat).
        seed: seeds the random directions, the projection and every forward pass's RNG.
        eps: finite-difference step along unit directions. Default 1e-6.
        rtol: relative tolerance: |analytic − numeric| <= atol + rtol·max(|analytic|,
            |numeric|), plus an allowance for float64 rounding in the differences.
        atol: absolute tolerance, as above.

    Returns a `GradcheckReport`. Syncs with the host (it is a test, not a training-step tool).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradcheck() needs a torch.nn.Module as model, got {type(model).__name__}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(isinstance(a, _ARGUMENT_TYPES) for a in args):
        raise TypeError("inputs must be a tensor or a tuple of model arguments")
    eps = 1e-6 if eps is None else float(eps)
    loss_of = loss_fn or (lambda out: _projection_loss(out, seed))
    checked, args = _in_float64(model, args)
    devices = {p.device for p in checked.parameters()} | {t.device for t in floating_tensors(args)}
    evaluate = _Evaluator(seed, list(devices))

    def loss() -> Tensor:
        return evaluate(lambda: loss_of(checked(*args)))

    base, captured = _capturing(checked, loss)
    if base.numel() != 1:
        raise InputError(f"loss_fn must return a scalar, got shape {tuple(base.shape)}")
    named = [(n, p) for n, p in checked.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(base, [p for _, p in named], allow_unused=True)
    padding = _padding_rows(checked)
    settings = Settings(eps, rtol, atol, padding)
    rows = _parameter_rows(named, grads, loss, float(base.detach()), seed, settings)
    notes = _notes(named, grads, padding)
    rows += [
        _checked_module_row(name, module, captured[name], evaluate, seed + 1000 + i, settings)
        for i, (name, module) in enumerate(checked.named_modules())
        if name in captured
    ]
    rows = [r for r in rows if r is not None]
    return GradcheckReport(rows, _culprits(rows), evaluate.count, notes)


_ARGUMENT_TYPES = (Tensor, int, float, bool, type(None), list, tuple, dict)


def _in_float64(model: nn.Module, args: tuple[Any, ...]) -> tuple[nn.Module, tuple[Any, ...]]:
    """A float64 deep copy of `model` without gradients, and detached float64 copies of the
    floating tensors in `args`: the user's model and inputs stay as they are."""
    checked = copy_model(model).double()
    for p in checked.parameters():
        p.grad = None
    return checked, map_floating(args, lambda t: t.detach().to(torch.float64))


def _notes(
    named: list[tuple[str, Tensor]], grads: tuple[Tensor | None, ...], padding: dict[int, int]
) -> list[str]:
    """What the report should say about parameters the check leaves (partly) out."""
    notes = [
        f"{n} gets no gradient (unused in the forward pass)"
        for (n, _), g in zip(named, grads, strict=True)
        if g is None
    ]
    return notes + [
        f"{n}: row {padding[id(p)]} (padding_idx) is left out of the directions, it gets no "
        "gradient by design"
        for n, p in named
        if id(p) in padding
    ]


def _capturing(
    model: nn.Module, loss: Callable[[], Tensor]
) -> tuple[Tensor, dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """`loss()` once, with the inputs each module of `model` received on the way (by name)."""
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = [
        m.register_forward_pre_hook(_capture(name, captured), with_kwargs=True)
        for name, m in model.named_modules()
    ]
    try:
        return loss(), captured
    finally:
        for h in handles:
            h.remove()


def _capture(name: str, captured: dict) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name not in captured:  # a module called twice is checked on its first call
            captured[name] = snapshot((args, kwargs))

    return hook


def _parameter_rows(
    named: list[tuple[str, Tensor]],
    grads: tuple[Tensor | None, ...],
    loss: Callable[[], Tensor],
    base: float,
    seed: int,
    settings: Settings,
) -> list[GradcheckRow]:
    """One row per parameter tensor: <∂L/∂p, v> against the central difference along v."""
    generator = torch.Generator().manual_seed(seed + 2)
    rows = []
    for (name, p), grad in zip(named, grads, strict=True):
        if grad is None:
            continue
        v = unit_direction(p, generator, settings.padding.get(id(p)))

        def shifted(step: float, p: Tensor = p, v: Tensor = v) -> tuple[float, float, float]:
            values = []
            with torch.no_grad():
                original = p.detach().clone()
                for sign in (1.0, -1.0):
                    p.copy_(original + sign * step * v)
                    values.append(float(loss()))
                p.copy_(original)
            return values[0], base, values[1]

        analytic = float((grad * v).sum())
        rows.append(compare(name, "parameter", analytic, shifted(settings.eps), settings, shifted))
    return rows


def _checked_module_row(
    name: str, module: nn.Module, captured: Any, *rest: Any
) -> GradcheckRow | None:
    """`_module_row`, or an inconclusive row saying why the module could not be re-run."""
    try:
        return _module_row(name, module, captured, *rest)
    except Exception as exc:
        return GradcheckRow(
            name,
            "module",
            "inconclusive",
            math.nan,
            math.nan,
            math.nan,
            f"could not re-run it on the inputs it received: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
        )


def _module_row(
    name: str,
    module: nn.Module,
    captured: tuple[tuple[Any, ...], dict[str, Any]],
    evaluate: _Evaluator,
    seed: int,
    settings: Settings,
) -> GradcheckRow | None:
    """<VJP_m(g), u> of module `name` against <g, m(x + εu) − m(x − εu)> / 2ε, on the inputs it
    received; None when it has nothing to check (no floating inputs, parameters or outputs)."""
    inputs = list(floating_tensors(captured))
    params = [p for p in module.parameters() if p.requires_grad]
    if not inputs and not params:
        return None
    generator = torch.Generator().manual_seed(seed)
    # Perturb only finite entries: masks with -inf stay as they are.
    directions = [unit_direction(t, generator) * torch.isfinite(t) for t in inputs]
    param_directions = [unit_direction(p, generator, settings.padding.get(id(p))) for p in params]

    def call(values: list[Tensor]) -> Any:
        """The module on a fresh copy of its captured inputs, floating ones replaced."""
        feed = iter(values)
        args, kwargs = map_floating(snapshot(captured), lambda t: next(feed))
        return module(*args, **kwargs)

    def run(shift: float) -> Any:
        return call([t + shift * d for t, d in zip(inputs, directions, strict=True)])

    leaves = [t.clone().requires_grad_() for t in inputs]

    def run_with_leaves() -> Any:
        # clones of the leaves go in, so in-place modules (ReLU(inplace=True)) are fine
        return call([leaf.clone() for leaf in leaves])

    output = evaluate(run_with_leaves)
    outs = list(floating_tensors(output))
    if not outs:
        return None
    cotangents = random_like(outs, seed + 1)
    projected = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
    wrt = leaves + params
    if not projected.requires_grad:
        return None
    vjp = torch.autograd.grad(projected, wrt, allow_unused=True)
    analytic = sum(
        float((g * d).sum())
        for g, d in zip(vjp, directions + param_directions, strict=True)
        if g is not None
    )

    projected_at = value_along(
        params, param_directions, lambda step: evaluate(lambda: run(step)), cotangents
    )

    def shifted(step: float) -> tuple[float, float, float]:
        return projected_at(step), projected_at(0.0), projected_at(-step)

    values = projected_at(settings.eps), float(projected.detach()), projected_at(-settings.eps)
    return compare(name, "module", analytic, values, settings, shifted)


def _culprits(rows: list[GradcheckRow]) -> list[str]:
    """Innermost mismatching modules: no mismatching module lies inside them."""
    bad = [r.name for r in rows if r.kind == "module" and r.status == "mismatch"]

    def inside(child: str, parent: str) -> bool:
        return child != parent and (parent == "" or child.startswith(parent + "."))

    return [b for b in bad if not any(inside(other, b) for other in bad)]
