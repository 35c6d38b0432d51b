"""The gradient noise scale from a step's parts (`stats/noise_scale.py`): micro-batches of
gradient accumulation here, DDP ranks in `test_distributed.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw


def mean_loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def explicit_noise_scale(model: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """McCandlish et al.'s estimate with B_small = one part, B_big = all of them."""
    small = [mean_loss_gradient(model, x, y) for x, y in parts]
    big = torch.stack(small).mean(dim=0)
    n, b = len(parts), parts[0][0].shape[0]
    small_square = torch.stack([g.square().sum() for g in small]).mean()
    big_square = big.square().sum()
    square = (n * big_square - small_square) / (n - 1)
    trace = b * (small_square - big_square) / (1 - 1 / n)
    return float(trace / square)


@pytest.mark.parametrize("divide", [True, False])
def test_micro_batches_give_the_explicit_noise_scale(divide, tmp_path):
    """4 micro-batches of 4: B_small = 4, B_big = 16. Dividing each loss by their number or not
    scales every gradient alike, which leaves B_simple as it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    parts = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    expected = explicit_noise_scale(model, parts)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the same gradients every step
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1) as w:
        for _ in range(6):
            optimizer.zero_grad()
            for xs, ys in parts:
                loss = nn.functional.cross_entropy(model(xs), ys)
                (loss / len(parts) if divide else loss).backward()
            optimizer.step()
    run = gw.open_run(tmp_path / "run")
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())
    noise, batch = run.series("gns_simple"), run.series("gns_batch")
    # step 0 cannot know it has parts before they come; then 3 estimates of warm-up
    assert np.isnan(batch[0]) and (batch[1:] == 16).all()
    assert np.isnan(noise[:4]).all()
    np.testing.assert_allclose(noise[4:], expected, rtol=1e-4)
    # lr 0 keeps the gradients equal, and not_updated says that the update is 0 for that reason
    assert all(f.kind in ("batch_size", "not_updated") for f in w.findings())
    assert all("learning rate is 0" in f.message for f in w.findings() if f.kind == "not_updated")


def test_one_part_per_step_has_no_noise_scale(tmp_path):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
    assert "gns_simple" not in gw.open_run(tmp_path / "run").scalar_names
