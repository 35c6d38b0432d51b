"""The three training workloads every gradwatch benchmark times: MLP, CNN, Transformer."""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Workload:
    """A model, its optimizer and one fixed batch; `step()` is one plain training step.

    After `compile()` the forward runs through `torch.compile(model)`.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def compile(self) -> None:
        self.forward = torch.compile(self.model)

    def with_model(self, model: nn.Module) -> Workload:
        """This workload training `model` instead: a fresh optimizer with the same settings, the
        same batch, compiled if this one is."""
        kind = type(self.optimizer)
        accepted = inspect.signature(kind).parameters
        settings = {k: v for k, v in self.optimizer.defaults.items() if k in accepted}
        optimizer = kind(model.parameters(), **settings)
        other = Workload(self.name, model, optimizer, self.inputs, self.targets)
        if self.forward is not None:
            other.compile()
        return other

    def twin(self) -> Workload:
        """The same workload on a copy of the model (same weights)."""
        return self.with_model(copy.deepcopy(self.model))

    def loss(self) -> torch.Tensor:
        forward = self.model if self.forward is None else self.forward
        return nn.functional.cross_entropy(forward(self.inputs), self.targets)

    def step(self, between: Callable[[], None] | None = None) -> torch.Tensor:
        """One step; `between` runs after backward and before the optimizer's update."""
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if between is not None:
            between()
        self.optimizer.step()
        return loss


class _PooledTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, nhead=4, dim_feedforward=512, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def mlp(device: torch.device) -> Workload:
    """MLP 784-1024-1024-1024-10, batch 128, SGD: memory-bound on CPU."""
    sizes = [784, 1024, 1024, 1024]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(1024, 10)).to(device)
    return Workload(
        "mlp",
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.randn(128, 784, device=device),
        torch.randint(0, 10, (128,), device=device),
    )


def cnn(device: torch.device) -> Workload:
    """Three conv layers on 3x32x32, batch 64, SGD with momentum."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).to(device)
    return Workload(
        "cnn",
        model,
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        torch.randn(64, 3, 32, 32, device=device),
        torch.randint(0, 10, (64,), device=device),
    )


def transformer(device: torch.device) -> Workload:
    """4-layer nn.TransformerEncoder, d_model 128, seq 64, batch 16, AdamW."""
    model = _PooledTransformer().to(device)
    return Workload(
        "transformer",
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-4),
        torch.randn(16, 64, 128, device=device),
        torch.randint(0, 10, (16,), device=device),
    )


WORKLOADS: dict[str, Callable[[torch.device], Workload]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
}
