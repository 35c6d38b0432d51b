"""The finite-difference math of `gw.gradcheck`: random unit directions, a function's value along
one (a module's output projected on a cotangent), and the judgement of an analytic derivative
against central and one-sided differences, with an allowance for float64 rounding."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.gradcheck_report import GradcheckRow
from gradwatch.structures import floating_tensors

ROUNDING = 64 * 2.0**-52  # float64 rounding allowance, relative to the values differenced


@dataclass(frozen=True)
class Settings:
    """How the differences are taken and judged: the step along unit directions, the
    tolerances, and the padding rows left out of the directions (by parameter id)."""

    eps: float
    rtol: float
    atol: float
    padding: dict[int, int]


def compare(
    name: str,
    kind: str,
    analytic: float,
    values: tuple[float, float, float],
    settings: Settings,
    recheck: Callable[[float], tuple[float, float, float]],
) -> GradcheckRow:
    """Judge an analytic derivative against central and one-sided differences, from the
    function's `values` at +eps, 0 and -eps along the direction."""
    plus, zero, minus = values
    eps, rtol, atol = settings.eps, settings.rtol, settings.atol
    numeric = (plus - minus) / (2 * eps)
    scale = max(abs(analytic), abs(numeric))
    noise = ROUNDING * max(abs(plus), abs(zero), abs(minus)) / eps
    tolerance = atol + rtol * scale + noise
    rel = abs(analytic - numeric) / scale if scale > 0 else 0.0

    def row(status: str, reason: str = "") -> GradcheckRow:
        return GradcheckRow(name, kind, status, analytic, numeric, rel, reason)

    if not all(math.isfinite(v) for v in (analytic, plus, zero, minus)):
        return row("inconclusive", "a non-finite value in the forward pass or the gradient")
    error = abs(analytic - numeric)
    if error <= tolerance:
        return row("ok")
    # Slopes at a step 1000x smaller must match the one-sided slopes at ε: a kink is piecewise
    # linear (same slopes at both scales), a smooth function barely curves in between, but a
    # function computed at low precision moves by whole rounding steps (0, or far too much).
    tiny = eps / 1000
    tiny_plus, _, tiny_minus = recheck(tiny)
    right, left = (plus - zero) / eps, (zero - minus) / eps
    tiny_right, tiny_left = (tiny_plus - zero) / tiny, (zero - tiny_minus) / tiny
    slack = 0.05 * (abs(right) + abs(left) + abs(analytic)) + ROUNDING * abs(zero) / tiny
    if abs(tiny_right - right) > slack or abs(tiny_left - left) > slack:
        return row(
            "inconclusive",
            "rounding dominates the difference: a cast to lower "
            "precision inside? (slopes at ε and ε/1000 disagree)",
        )
    if abs(right - left) > max(1e-3 * scale, tolerance):
        return row(
            "inconclusive",
            f"a kink (ReLU at 0, max, abs, sort): the one-sided slopes "
            f"{left:.4g} and {right:.4g} differ",
        )
    return row("mismatch", f"autograd {analytic:.6g} vs finite difference {numeric:.6g}")


def unit_direction(
    like: Tensor, generator: torch.Generator, frozen_rows: int | None = None
) -> Tensor:
    """A random unit direction shaped like `like`; row `frozen_rows` (a padding row) stays 0."""
    v = torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device)
    if frozen_rows is not None:
        v[frozen_rows] = 0.0
    return v / v.norm().clamp_min(1e-300)


def value_along(
    params: list[Tensor],
    directions: list[Tensor],
    output_at: Callable[[float], Any],
    cotangents: list[Tensor],
) -> Callable[[float], float]:
    """<g, m(x + step·u)> as a function of `step`: the parameters are moved along their
    `directions` for the call (`output_at` moves the inputs) and put back after it."""

    def projected_at(step: float) -> float:
        with torch.no_grad():
            originals = [p.detach().clone() for p in params]
            for p, d in zip(params, directions, strict=True):
                p.add_(step * d)
            try:
                out = output_at(step)
                return float(
                    sum(
                        (o * c).sum()
                        for o, c in zip(floating_tensors(out), cotangents, strict=True)
                    )
                )
            finally:
                for p, original in zip(params, originals, strict=True):
                    p.copy_(original)

    return projected_at


def random_like(tensors: list[Tensor], seed: int) -> list[Tensor]:
    """N(0, 1) tensors shaped like `tensors` (the cotangents g of a module's outputs), drawn on
    the CPU from `seed` so that every device draws the same."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
