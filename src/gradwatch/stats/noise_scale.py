"""The gradient noise scale B_simple from per-example gradient norms, smoothed over probe steps.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, App. A):
with |G_B|² the squared norm of the gradient of a batch of B examples, unbiased estimates of the
true gradient's squared norm and of the trace of the per-example covariance follow from two batch
sizes B_small < B_big:

    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Here B_small = 1 (|G_small|² is the mean of the per-example squared norms ‖∇ℓ_i‖²) and B_big = B
(the step's batch gradient). Both estimates are noisy, so each is smoothed with its own
exponential moving average (`BETA`, initialised with the first estimate, no bias correction),
and B_simple = tr(Σ)_ema / |G|²_ema. Nothing is reported for the first `WARM_UP` estimates, nor
while |G|²_ema ≤ 0 (at small B the estimate of |G|² can be negative when the noise dominates):
B_simple is then NaN. Runs on the device; no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

BETA = 0.9
WARM_UP = 3


class NoiseScale:
    """B_simple, updated from each probe step's per-example and batch gradient norms."""

    def __init__(self) -> None:
        self._trace: Tensor | None = None
        self._square: Tensor | None = None
        self._count = 0

    def update(self, example_squares: Tensor, batch_square: Tensor) -> Tensor:
        """Take one step's per-example squared norms [B] and the batch gradient's squared norm;
        return the smoothed B_simple (0-dim, NaN during warm-up or while |G|²_ema ≤ 0)."""
        batch = example_squares.numel()
        if batch < 2:  # one example: no second batch size to compare with
            return torch.full((), torch.nan, device=example_squares.device)
        small = example_squares.double().mean()
        big = batch_square.double()
        square = (batch * big - small) / (batch - 1)
        trace = (small - big) / (1 - 1 / batch)
        if self._trace is None or self._square is None:
            self._trace, self._square = trace, square
        else:
            self._trace = BETA * self._trace + (1 - BETA) * trace
            self._square = BETA * self._square + (1 - BETA) * square
        self._count += 1
        if self._count <= WARM_UP:
            return torch.full_like(trace, torch.nan).float()
        ratio = self._trace / self._square
        return torch.where(self._square > 0, ratio, torch.nan).float()

    def state_dict(self) -> dict[str, object]:
        return {"trace": self._trace, "square": self._square, "count": self._count}
