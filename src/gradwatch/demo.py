"""`gradwatch demo`: three deep MLPs on scikit-learn's bundled digits, one that vanishes, one that
explodes, and the repaired one that trains; each watched, diagnosed and stored as a run."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import gradwatch as gw
from gradwatch.extras import optional


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits (1797 images, shipped with scikit-learn), standardised, 80/20 split."""
    data = optional("sklearn.datasets", "the demo").load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def sigmoid_mlp(depth: int = 24, width: int = 64) -> nn.Sequential:
    """A deep sigmoid MLP with PyTorch's default init: the textbook vanishing gradient."""
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def large_init_relu_mlp(depth: int = 12, width: int = 128) -> nn.Sequential:
    """A deep ReLU MLP with N(0, 1) weights: each layer multiplies the signal by ~sqrt(width/2)."""
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.0)
    return model


class ResidualBlock(nn.Module):
    """x + Linear(GELU(LayerNorm(x))): normalised, non-saturating, with an identity path."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.act = nn.GELU()
        self.linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.act(self.norm(x)))


def repaired_mlp(depth: int = 24, width: int = 64) -> nn.Sequential:
    """The same depth as the vanishing net, repaired: GELU, He init, LayerNorm, residual paths."""
    return nn.Sequential(
        nn.Linear(64, width),
        *(ResidualBlock(width) for _ in range(depth - 2)),
        nn.LayerNorm(width),
        nn.Linear(width, 10),
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    story: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]


SCENARIOS = (
    Scenario("vanishing", "24-layer sigmoid MLP, default init, SGD", sigmoid_mlp,
             lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    Scenario("exploding", "12-layer ReLU MLP, N(0,1) init, SGD", large_init_relu_mlp,
             lambda m: torch.optim.SGD(m.parameters(), lr=1e-4)),
    Scenario("repaired", "24-layer residual MLP, GELU + LayerNorm + He init, AdamW", repaired_mlp,
             lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
)  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    scenario: Scenario
    run_dir: Path
    findings: list[gw.Finding]
    final_loss: float
    test_accuracy: float
    report: Path


def train_scenario(
    scenario: Scenario, run_dir: Path, steps: int, advance: Callable[[], None] = lambda: None
) -> Outcome:
    """Train one scenario for `steps` steps of batch 64 under gw.watch and collect its findings."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits()
    model = scenario.model()
    optimizer = scenario.optimizer(model)
    batches = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    with gw.watch(model, optimizer, run_dir=run_dir) as w:
        for _ in range(steps):
            index = torch.randint(0, len(x_train), (64,), generator=batches)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
            advance()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    page = gw.report(run_dir, run_dir / "report.html")
    return Outcome(scenario, run_dir, w.findings(), loss.item(), accuracy, page)


def run_demo(out_dir: Path, steps: int = 300) -> list[Outcome]:
    """Train every scenario with a progress bar and print what gradwatch found in each."""
    Console = optional("rich.console", "the demo").Console
    Progress = optional("rich.progress", "the demo").Progress
    console = Console()
    outcomes = []
    with Progress(console=console, transient=False) as progress:
        for scenario in SCENARIOS:
            run_dir = out_dir / scenario.name
            if run_dir.exists():  # the demo owns this folder: replace its earlier run
                shutil.rmtree(run_dir)
            task = progress.add_task(f"{scenario.name:>9}: {scenario.story}", total=steps)
            outcomes.append(
                train_scenario(scenario, run_dir, steps, lambda task=task: progress.advance(task))
            )
    for outcome in outcomes:
        console.rule(f"[bold]{outcome.scenario.name}[/]: {outcome.scenario.story}")
        console.print(
            f"final loss {outcome.final_loss:.3g}, test accuracy {outcome.test_accuracy:.1%}\n"
            f"run store: {outcome.run_dir}\nreport:    {outcome.report}",
            highlight=False,
        )
        if not outcome.findings:
            console.print("[green]no findings: the gradients are healthy[/]")
        for finding in outcome.findings:
            console.print(str(finding), markup=False, highlight=False)
    return outcomes
