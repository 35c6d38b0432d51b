"""Every per-tensor statistic equals a plain-PyTorch reference computed in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_mlp
from torch import nn

import gradwatch as gw


def reference_step(model: nn.Module, optimizer, x, y, names: list[str]) -> dict[str, np.ndarray]:
    """Run one training step and compute every statistic with plain PyTorch, per watched tensor."""
    loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = dict(model.named_parameters())
    before = {n: params[n].detach().float().clone() for n in names}
    ref = {k: [] for k in ("grad_norm", "grad_max", "grad_nonfinite", "param_norm")}
    for n in names:
        g = params[n].grad
        if g is None:
            for k in ("grad_norm", "grad_max", "grad_nonfinite"):
                ref[k].append(math.nan)
        else:
            g = g.float()
            ref["grad_norm"].append(torch.linalg.vector_norm(g).item())
            ref["grad_max"].append(g.abs().max().item())
            ref["grad_nonfinite"].append((~torch.isfinite(g)).sum().item())
        ref["param_norm"].append(torch.linalg.vector_norm(before[n]).item())
    optimizer.step()
    ref["update_ratio"] = [
        (
            torch.linalg.vector_norm(params[n].detach().float() - before[n])
            / torch.linalg.vector_norm(before[n])
        ).item()
        for n in names
    ]
    return {k: np.array(v) for k, v in ref.items()}


def check_against_reference(model, tmp_path, dtype, steps=4, tol=1e-5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=2, flush_every=3) as w:
        names = w.inventory.names
        refs = []
        for _ in range(steps):
            x = torch.randn(8, 6, dtype=dtype)
            refs.append(reference_step(model, optimizer, x, torch.randint(0, 3, (8,)), names))
    run = gw.open_run(tmp_path / "run")
    assert run.tensors == names
    np.testing.assert_array_equal(run.steps, np.arange(steps))
    for step, ref in enumerate(refs):
        np.testing.assert_allclose(run.series("grad_norm")[step], ref["grad_norm"], rtol=tol)
        probe_stats = ("grad_max", "grad_nonfinite", "param_norm", "update_ratio")
        if step % 2 == 0:  # probe steps
            for stat in probe_stats:
                np.testing.assert_allclose(
                    run.series(stat)[step], ref[stat], rtol=tol, err_msg=stat
                )
        else:
            for stat in probe_stats:
                assert np.isnan(run.series(stat)[step]).all(), stat
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_equal_plain_pytorch(tmp_path, dtype):
    # bf16: gradwatch accumulates in fp32 like the reference; the update itself is bf16-rounded.
    run = check_against_reference(
        small_mlp(dtype), tmp_path, dtype, tol=1e-5 if dtype == torch.float32 else 2e-2
    )
    ggn = run.series("global_grad_norm")
    np.testing.assert_allclose(
        ggn, np.sqrt(np.nansum(run.series("grad_norm") ** 2, axis=1)), rtol=1e-5
    )


def test_frozen_parameters_are_not_watched(tmp_path):
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    run = check_against_reference(model, tmp_path, torch.float32)
    assert "0.weight" not in run.tensors
    assert run.meta["not_watched"] == {"0.weight": "frozen"}


def test_shared_parameter_is_watched_once_with_its_summed_gradient(tmp_path):
    model = small_mlp()
    model[2].weight = nn.Parameter(torch.randn(16, 16) * 0.1)
    model.add_module("tied", nn.Linear(16, 16))
    model.tied.weight = model[2].weight  # tied weights: one tensor, two modules

    class Tied(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner[1](self.inner[0](x))
            h = self.inner.tied(self.inner[2](h))
            return self.inner[4](self.inner[3](h))

    run = check_against_reference(Tied(model), tmp_path, torch.float32)
    assert run.tensors.count("inner.2.weight") == 1
    assert "inner.tied.weight" not in run.tensors


def test_none_gradients_are_nan_and_do_not_disturb_the_others(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_mlp()
            self.unused = nn.Linear(3, 3)  # never called: its .grad stays None

        def forward(self, x):
            return self.body(x)

    run = check_against_reference(Branchy(), tmp_path, torch.float32)
    unused = [i for i, n in enumerate(run.tensors) if n.startswith("unused")]
    assert unused
    assert np.isnan(run.series("grad_norm")[:, unused]).all()
    assert np.isfinite(run.series("param_norm")[0, unused]).all()


def test_nonfinite_gradients_are_counted_on_probe_steps(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1) as w:
        loss = model(torch.randn(4, 6)).sum()
        loss.backward()
        model[2].weight.grad[0, :5] = torch.nan
        model[2].weight.grad[1, 0] = -torch.inf
        optimizer.step()
        names = w.inventory.names
    run = gw.open_run(tmp_path / "run")
    counts = run.series("grad_nonfinite")[0]
    expected = [6 if n == "2.weight" else 0 for n in names]
    np.testing.assert_array_equal(counts, expected)
    i = names.index("2.weight")
    assert np.isnan(run.series("grad_norm")[0, i]) and np.isnan(run.series("grad_max")[0, i])
