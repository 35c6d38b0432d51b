"""Detectors: models built to fail in known ways get the right finding at the right layer; healthy
models get none of vanishing, exploding, dead_units, saturation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.demo import large_init_relu_mlp, repaired_mlp, sigmoid_mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from workloads import cnn, transformer

PROBLEMS = {"vanishing", "exploding", "dead_units", "saturation"}


def train(model, tmp_path, steps=60, lr=0.05, in_features=64, optimizer=None, probe_every=10):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "run", flush_every=20, probe_every=probe_every
    ) as w:
        for _ in range(steps):
            x, y = torch.randn(32, in_features), torch.randint(0, 10, (32,))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
    assert gw.open_run(tmp_path / "run").findings == w.findings()  # stored as returned
    return w.findings()


def kinds(findings, kind):
    return [f for f in findings if f.kind == kind]


def test_deep_sigmoid_mlp_vanishes_in_the_first_layers(tmp_path):
    findings = kinds(train(sigmoid_mlp(depth=20), tmp_path), "vanishing")
    assert len(findings) == 1
    finding = findings[0]
    assert finding.layer == "0"  # the first Linear
    assert finding.step == 0
    assert finding.evidence["first_to_last"] < 1e-6
    assert "Sigmoid" in finding.message and "kaiming" in finding.remedy


def test_a_failing_detector_is_reported_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    from gradwatch.detect import diagnosis

    def broken(block, layout, memory):
        raise ZeroDivisionError("a bug in a detector")

    monkeypatch.setattr(diagnosis, "RULES", (broken, *diagnosis.RULES))
    assert diagnosis.RULES[0] is broken
    findings = train(sigmoid_mlp(depth=20), tmp_path)  # three blocks of 20 steps
    assert [f.layer for f in kinds(findings, "vanishing")] == ["0"]
    failures = [r for r in caplog.records if "broken detector failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is ZeroDivisionError


def test_normal_init_deep_relu_mlp_explodes(tmp_path):
    findings = kinds(train(large_init_relu_mlp(depth=10), tmp_path, lr=1e-9), "exploding")
    assert findings and findings[0].layer == "0"
    assert findings[0].evidence["growth_per_layer"] > 3


class PoisonAt(nn.Module):
    """Returns NaN at one chosen call of forward: a module that produces a non-finite value."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        poison = torch.nan if self.calls - 1 == self.step else 1.0
        return x * self.gain * poison


def test_nonfinite_names_the_module_and_the_step_where_it_started(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
    model.add_module("poison", PoisonAt(step=7))
    model.add_module("tail", nn.Sequential(nn.ReLU(), nn.Linear(32, 10)))
    findings = kinds(train(model, tmp_path, steps=30), "nonfinite")
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.layer, finding.step) == ("poison", 7)
    assert finding.evidence["direction"] == "forward"
    assert finding.evidence["parameters_hit"]  # the NaN step went into the weights
    assert "custom code" in finding.message


class LogAt(nn.Module):
    """Custom code without parameters: a log that meets a negative input at one chosen call."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        shift = -100.0 if self.calls - 1 == self.step else 0.0
        return torch.log(torch.nn.functional.softplus(x) + shift + 1e-3)


def test_nonfinite_names_a_custom_module_without_parameters(tmp_path):
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), LogAt(step=11), nn.Linear(32, 10)
    )
    findings = kinds(train(model, tmp_path, steps=30, probe_every=7), "nonfinite")
    assert [(f.layer, f.step) for f in findings] == [("3", 11)]  # 11 is not a probe step


def test_negative_bias_before_relu_gives_dead_units_at_that_layer(tmp_path):
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    findings = kinds(train(model, tmp_path), "dead_units")
    assert [f.layer for f in findings] == ["2"]
    assert findings[0].evidence["dead_frac"] == 1.0
    assert findings[0].evidence["activation"] == "3"


def test_tanh_fed_huge_inputs_saturates(tmp_path):
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    findings = kinds(train(model, tmp_path, lr=1e-3), "saturation")
    assert [f.layer for f in findings][:1] == ["1"]
    assert findings[0].evidence["saturated_frac"] > 0.9


def test_a_single_gradient_spike_is_found(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # lr 0 keeps the model as it is, so the corrupted batch's aftermath does not add spikes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", flush_every=25) as w:
        for step in range(60):
            x = torch.randn(32, 64) * (1000.0 if step == 40 else 1.0)  # one corrupted batch
            nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,))).backward()
            optimizer.step()
            optimizer.zero_grad()
    spikes = kinds(w.findings(), "spike")
    assert len(spikes) == 1 and spikes[0].step == 40
    assert spikes[0].evidence["count"] == 1


@pytest.mark.parametrize("name", ["residual_mlp", "cnn", "transformer"])
def test_healthy_models_have_no_problem_findings(tmp_path, name):
    if name == "residual_mlp":
        model = repaired_mlp(depth=16)
        found = train(model, tmp_path, steps=300, optimizer=torch.optim.AdamW(model.parameters()))
    else:
        work = (cnn if name == "cnn" else transformer)(torch.device("cpu"))
        with gw.watch(work.model, work.optimizer, run_dir=tmp_path / "run") as w:
            for _ in range(300):
                w.log(loss=work.step())
        found = w.findings()
    assert not [f for f in found if f.kind in PROBLEMS], [str(f) for f in found]


def train_binary(model, tmp_path, steps=200, lr=1e-2):
    """Adam with BCE on an easy task (the label is the sign of the first input)."""
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=lr)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", flush_every=20) as w:
        for _ in range(steps):
            x = torch.randn(64, 8)
            y = (x[:, :1] > 0).float()
            loss = nn.functional.binary_cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return w.findings(), loss.item()


def last_recorded(run, stat, module):
    values = run.series(stat)[:, run.modules.index(module)]
    return values[np.isfinite(values)][-1]


def test_a_confident_sigmoid_output_layer_is_not_saturation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    findings, loss = train_binary(model, tmp_path)
    run = gw.open_run(tmp_path / "run")
    # The temptation is real: the output sits at its bounds on most examples...
    assert last_recorded(run, "saturated_frac", "3") > 0.5
    assert loss < 0.1  # ...because the model is right and confident
    assert findings == []


def test_saturated_units_after_a_frozen_backbone_are_not_a_finding(tmp_path):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    with torch.no_grad():
        backbone[0].weight.mul_(100.0)  # saturates the tanh; nothing before it trains
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(32, 1), nn.Sigmoid())
    findings, _ = train_binary(model, tmp_path, steps=60)
    run = gw.open_run(tmp_path / "run")
    assert last_recorded(run, "saturated_frac", "0.1") > 0.9
    assert findings == []
