from __future__ import annotations

import threading

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


class HostSyncError(AssertionError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Make every host-syncing Tensor method raise when called from the training thread."""
    main = threading.main_thread()

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if threading.current_thread() is main:
                raise HostSyncError(f"Tensor.{name} called in the step path")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        forbid(name)
