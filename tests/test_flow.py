"""Module probes: per-module statistics equal plain-PyTorch references, in forward order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.stats.flow import MODULE_STATS
from gradwatch.stats.module_outputs import activation_moments
from gradwatch.stats.through_time import TIME_STATS


class Reordered(nn.Module):
    """Modules defined in one order and called in another, with an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.squash = nn.Tanh()
        self.body = nn.Linear(16, 16)
        self.relu = nn.ReLU(inplace=True)
        self.stem = nn.Linear(6, 16)
        with torch.no_grad():
            self.body.bias[:4] = -100.0  # four units that never fire after the ReLU
            self.stem.weight.mul_(8.0)  # large inputs to the tanh: some saturation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.body(self.squash(self.stem(x)))))


def reference(model: Reordered, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    outputs = {}
    h = model.stem(x)
    outputs["stem"] = h
    h = model.squash(h)
    outputs["squash"] = h
    h = model.body(h)
    outputs["body"] = h
    h = torch.relu(h)
    outputs["relu"] = h
    out = model.head(h)
    outputs["head"] = out
    for t in outputs.values():
        t.retain_grad()
    nn.functional.cross_entropy(out, y).backward()
    ref = {}
    for name, t in outputs.items():
        v = t.detach()
        sat = (v.abs() >= 0.98).float().mean().item() if name == "squash" else np.nan
        ref[name] = {
            "signal_norm": torch.linalg.vector_norm(t.grad).item(),
            "act_mean": v.mean().item(),
            "act_std": v.std().item(),
            "dead_frac": (v.abs().amax(dim=0) == 0).float().mean().item(),
            "saturated_frac": sat,
            "act_nonfinite": 0.0,
            "nonfinite_rank": np.nan,  # no output held NaN/Inf
            "norm_values": np.nan,  # no BatchNorm
            **dict.fromkeys(TIME_STATS, np.nan),  # no recurrent module
        }
    return ref


def test_module_statistics_equal_plain_pytorch_in_forward_order(tmp_path):
    model = Reordered()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it was
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=1):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    run = gw.open_run(tmp_path / "r")
    assert run.modules == ["stem", "squash", "body", "relu", "head"]
    model.zero_grad()
    ref = reference(model, x, y)
    for stat in MODULE_STATS:
        np.testing.assert_allclose(
            run.series(stat)[0], [ref[m][stat] for m in run.modules], rtol=1e-5, err_msg=stat
        )
    assert run.series("dead_frac")[0, run.modules.index("relu")] == pytest.approx(4 / 16)


def test_probe_statistics_wait_for_probe_steps_but_nonfinite_flags_do_not(tmp_path):
    model = Reordered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=3):
        for _ in range(5):
            nn.functional.cross_entropy(
                model(torch.randn(8, 6)), torch.randint(0, 3, (8,))
            ).backward()
            optimizer.step()
            optimizer.zero_grad()
    run = gw.open_run(tmp_path / "r")
    probed = ~np.isnan(run.series("signal_norm")).all(axis=1)
    np.testing.assert_array_equal(run.steps[probed], [0, 3])
    flags = run.series("act_nonfinite")
    layers = [run.modules.index(m) for m in ("stem", "body", "head")]
    activations = [run.modules.index(m) for m in ("squash", "relu")]
    np.testing.assert_array_equal(flags[:, layers], np.zeros((5, 3)))  # every step
    np.testing.assert_array_equal(flags[[0, 3]][:, activations], np.zeros((2, 2)))
    assert np.isnan(flags[[1, 2, 4]][:, activations]).all()  # torch.nn activations: probes only


def test_evaluation_passes_are_not_counted(tmp_path):
    model = Reordered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=1):
        with torch.no_grad():
            model(torch.full((4, 6), torch.nan))  # an evaluation pass that is not this step's
        nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
    assert (gw.open_run(tmp_path / "r").series("act_nonfinite") == 0).all()


def test_a_module_whose_output_is_not_a_tensor_is_reported_by_name(tmp_path):
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return {"y": x * self.scale}

    model = nn.Sequential()
    model.add_module("dict_out", DictOut())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r"):
        with pytest.warns(UserWarning, match=r"cannot probe module 'dict_out' \(DictOut\)"):
            out = model.dict_out(torch.randn(2, 4))["y"]
        out.sum().backward()
        optimizer.step()
    assert np.isnan(gw.open_run(tmp_path / "r").series("act_nonfinite")).all()


@pytest.mark.parametrize(
    "y",
    [
        torch.randn(64, 8, 6, 6).relu(),  # a CNN's activations
        100 + 0.01 * torch.randn(32, 50),  # a large mean: the shift keeps it from cancelling
        torch.randn(7),  # a vector
        torch.randn(1, 1),
        torch.zeros(0, 5),  # an empty batch
    ],
    ids=["relu", "offset", "vector", "one", "empty"],
)
def test_activation_moments_equal_float64(y):
    n, total, squared_mean, spread, saturated = activation_moments(y, None).tolist()
    wide = y.double()
    assert n == y.numel() and np.isnan(saturated)
    mean = wide.mean().item() if y.numel() else 0.0
    np.testing.assert_allclose(total, n * mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(squared_mean, n * mean * mean, rtol=1e-6, atol=1e-9)
    expected = ((wide - mean) ** 2).sum().item() if y.numel() else 0.0
    np.testing.assert_allclose(spread, expected, rtol=1e-5, atol=1e-9)
