from __future__ import annotations

import pytest
import torch
from ci_skips import (  # noqa: F401 - pytest finds hooks by name here
    pytest_configure,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, dtype=torch.float32) -> Tensor:
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.randint(0, 3, (32,))
    loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
