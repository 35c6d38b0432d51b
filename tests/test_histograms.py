"""Histograms on probe steps: counts equal numpy.histogram with the documented edges, they reach
TensorBoard as histograms, and the `underflow` finding comes for fp16 without a loss scale only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.stats.histograms import ACT_HIST_EDGES, GRAD_HIST_EDGES, grad_histograms


def dead_unit_mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    with torch.no_grad():
        model[0].bias[:5] = -100.0  # five units never fire: exact zeros in the gradients
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_equal_numpy_histogram_with_the_documented_edges(tmp_path, dtype):
    model = dead_unit_mlp(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(16, 8, dtype=dtype), torch.randint(0, 4, (16,))
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "run", probe_every=2, histogram_every=1
    ) as w:
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            grads = {n: p.grad.float().numpy().copy() for n, p in model.named_parameters()}
            optimizer.step()
    with torch.no_grad():
        hidden = model[0](x)
        outputs = {"0": hidden, "1": torch.relu(hidden), "2": model[2](torch.relu(hidden))}
    run = gw.open_run(w.run_dir)
    edges, counts = run.histogram("grad_hist")
    np.testing.assert_array_equal(edges, GRAD_HIST_EDGES)
    assert counts.shape == (3, len(run.tensors), len(edges) - 1)
    assert np.isnan(counts[1]).all()  # step 1 is not a probe step
    for i, name in enumerate(run.tensors):
        with np.errstate(divide="ignore"):
            expected, _ = np.histogram(np.log10(np.abs(grads[name])), bins=edges)
        np.testing.assert_array_equal(counts[2, i], expected, err_msg=name)
    zeros = run.tensors.index("0.weight")
    assert counts[2, zeros, 0] >= 5 * 8  # the dead units' rows, in the zeros' own bin
    edges, counts = run.histogram("act_hist")
    np.testing.assert_array_equal(edges, ACT_HIST_EDGES)
    for i, name in enumerate(run.modules):
        expected, _ = np.histogram(outputs[name].float().numpy(), bins=edges)
        np.testing.assert_array_equal(counts[2, i], expected, err_msg=name)
    with pytest.raises(KeyError, match="grad_hist, act_hist"):
        run.histogram("weights")


def test_chunks_and_non_finite_entries():
    """Tensors split over chunks count as when counted alone; NaN/Inf are left out."""
    torch.manual_seed(0)
    grads = [torch.randn(5000) * 10.0 ** torch.randint(-30, 5, (5000,)) for _ in range(3)]
    grads[1][:7] = torch.nan
    grads[1][7:9] = torch.inf
    grads[2][:100] = 0.0
    counts = grad_histograms(grads).numpy()
    for g, row in zip(grads, counts, strict=True):
        finite = g[torch.isfinite(g)].numpy()
        with np.errstate(divide="ignore"):
            expected, _ = np.histogram(np.log10(np.abs(finite)), bins=GRAD_HIST_EDGES)
        np.testing.assert_array_equal(row, expected)
    from gradwatch.stats import histograms

    small = histograms.CHUNK_ELEMENTS
    try:
        histograms.CHUNK_ELEMENTS = 6000  # every tensor in a chunk of its own
        np.testing.assert_array_equal(grad_histograms(grads).numpy(), counts)
    finally:
        histograms.CHUNK_ELEMENTS = small


def test_tensorboard_export_holds_the_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradwatch.sinks.tensorboard import export_tensorboard

    model = dead_unit_mlp(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "run", probe_every=5, histogram_every=1
    ) as w:
        for _ in range(12):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                model(torch.randn(16, 8)), torch.randint(0, 4, (16,))
            )
            loss.backward()
            optimizer.step()
    export_tensorboard(w.run_dir, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    run = gw.open_run(w.run_dir)
    expected_tags = [f"grad_hist/{t}" for t in run.tensors] + [f"act_hist/{m}" for m in run.modules]
    assert sorted(events.Tags()["histograms"]) == sorted(expected_tags)
    _, counts = run.histogram("grad_hist")
    written = events.Histograms("grad_hist/0.weight")
    assert [e.step for e in written] == [0, 5, 10]
    for event in written:
        row = list(run.steps).index(event.step)
        np.testing.assert_array_equal(event.histogram_value.bucket, counts[row, 0])
        assert event.histogram_value.num == 8 * 32


class SmallInputs(nn.Module):
    """An MLP whose input features are ~1e-5 (unnormalised): the first layer's weight gradient
    δ·xᵀ is ~1e-9, below what fp16 holds, while the signal through the net is normal."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_fp16(tmp_path, scaler, steps=40):
    torch.manual_seed(0)
    model = SmallInputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    # histograms every probe step (every 10 steps), so that 40 steps hold the 3 in a row
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", histogram_every=1) as w:
        for _ in range(steps):
            x = torch.randn(64, 16, generator=generator) * 1e-5
            y = torch.randint(0, 4, (64,), generator=generator)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            w.log(loss=loss.float())
    return w.findings()


def test_fp16_without_a_loss_scale_raises_underflow_at_the_layer(tmp_path):
    findings = train_fp16(tmp_path, scaler=None)
    assert [(f.kind, f.layer) for f in findings] == [("underflow", "net.0")]
    finding = findings[0]
    assert finding.step == 0 and finding.evidence["precision"] == "float16"
    assert finding.evidence["tensors"] == ["net.0.weight"]
    assert finding.evidence["lost_share"] > 0.9
    assert "GradScaler" in finding.remedy


def test_the_same_with_gradscaler_raises_nothing(tmp_path):
    assert train_fp16(tmp_path, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dead_units_zeros_are_not_underflow(tmp_path, dtype):
    """Dead ReLU units zero whole rows of the gradient: that is dead_units (fp32 has no
    underflow finding at all; in fp16 the dead share is subtracted)."""
    model = dead_unit_mlp(dtype)
    with torch.no_grad():
        model[0].bias[:28] = -100.0  # 28 of 32 units dead: 87% zero rows
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", histogram_every=1) as w:
        for _ in range(40):
            optimizer.zero_grad()
            out = model(torch.randn(16, 8, dtype=dtype)).float()
            nn.functional.cross_entropy(out, torch.randint(0, 4, (16,))).backward()
            optimizer.step()
    assert "underflow" not in {f.kind for f in w.findings()}
    assert "dead_units" in {f.kind for f in w.findings()}


def test_values_on_edges_land_in_numpy_bins():
    """Values on edges that float32 holds exactly (±1 as a saturated tanh gives, 10, 1e4), signed
    zeros and the open ends."""
    from gradwatch.stats.histograms import act_histogram

    y = torch.tensor(
        [
            -2e4,
            -1e4,
            -100.0,
            -1.0,
            -0.0,
            0.0,
            3e-7,
            -3e-7,
            1.0,
            10.0,
            1e4,
            2e4,
            torch.nan,
            -torch.inf,
        ]
    )
    expected, _ = np.histogram(y[torch.isfinite(y)].numpy(), bins=ACT_HIST_EDGES)
    np.testing.assert_array_equal(act_histogram(y).numpy(), expected)
    g = torch.tensor([0.0, -0.0, 1e-30, 1.0, -1.0, 10.0, 1e4, 1e5, 2.0**-126])
    with np.errstate(divide="ignore"):
        expected, _ = np.histogram(np.log10(np.abs(g.numpy())), bins=GRAD_HIST_EDGES)
    np.testing.assert_array_equal(grad_histograms([g]).numpy()[0], expected)


def test_histograms_come_every_nth_probe_step_and_can_be_turned_off(tmp_path):
    model = dead_unit_mlp(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for histogram_every, expected in [(2, [0, 6]), (None, [])]:
        run_dir = tmp_path / str(histogram_every)
        with gw.watch(
            model, optimizer, run_dir=run_dir, probe_every=3, histogram_every=histogram_every
        ):
            for _ in range(8):
                optimizer.zero_grad()
                model(torch.randn(4, 8)).sum().backward()
                optimizer.step()
        run = gw.open_run(run_dir)
        for name in ("grad_hist", "act_hist"):
            counts = run.histogram(name)[1]
            assert list(run.steps[np.isfinite(counts).all(axis=(1, 2))]) == expected
    with pytest.raises(ValueError, match="histogram_every must be an int >= 1"):
        gw.watch(model, optimizer, run_dir=tmp_path / "bad", histogram_every=0)
