"""Gradients through time: the per-time-step profile equals plain PyTorch's ‖∂L/∂x_t‖, and the
vanishing / exploding findings come for long recurrences and not for short ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradwatch as gw
from gradwatch.report.html import write_pngs
from gradwatch.stats.through_time import SURVIVAL

FEATURES, HIDDEN = 8, 64


class ManyToOne(nn.Module):
    """A recurrent module read at the last time step by a Linear head; `stem` (optional) makes
    the recurrent module's input require grad."""

    def __init__(self, kind: str, batch_first: bool = True, stem: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, FEATURES) if stem else nn.Identity()
        self.rnn = getattr(nn, kind)(FEATURES, HIDDEN, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.stem(x))
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


class CellLoop(nn.Module):
    """Research-code style: an LSTMCell called once per time step."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[0], HIDDEN)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def first_step_task(steps: int, batch: int = 32, seed: int = 0):
    """A many-to-one task whose answer sits in the first time step."""
    x = torch.randn(batch, steps, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0, 0] > 0).long()


def reference_profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, time_dim: int = 1):
    """‖∂L/∂x_t‖ at the recurrent module's input, with x.requires_grad_() in plain PyTorch."""
    model = copy.deepcopy(model)
    seen = {}
    recurrent = next(m for m in model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase)))

    def keep_input(module, args):
        inp = args[0]
        if not inp.requires_grad:
            inp = inp.detach().requires_grad_()
        inp.retain_grad()
        seen.setdefault("inputs", []).append(inp)
        return (inp, *args[1:])

    recurrent.register_forward_pre_hook(keep_input)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [i.grad for i in seen["inputs"]]
    if len(grads) > 1:  # a cell: one input per time step
        return torch.stack([g.norm() for g in grads]).numpy()
    others = tuple(d for d in range(grads[0].dim()) if d != time_dim)
    return grads[0].square().sum(dim=others).sqrt().numpy()


def summary(profile: np.ndarray) -> tuple[float, float, float]:
    """The documented time_first_to_last, time_decay and time_reach, in numpy."""
    nonzero = np.flatnonzero(profile > 0)
    first, last = nonzero[0], nonzero[-1]
    below = np.flatnonzero(profile[: last + 1] < SURVIVAL * profile[last])
    reach = last - (below[-1] if below.size else -1)
    decay = (profile[first] / profile[last]) ** (1 / (last - first))
    return profile[0] / profile[last], decay, reach


def watched_probe(model, x, y, tmp_path, steps: int = 1):
    """Train `steps` steps on (x, y) under gw.watch (probe every step); the run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays: one reference serves
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1) as w:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return gw.open_run(w.run_dir)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize(("batch_first", "stem"), [(True, False), (False, True)])
def test_profile_equals_plain_pytorch_per_time_step(tmp_path, kind, batch_first, stem):
    torch.manual_seed(0)
    model = ManyToOne(kind, batch_first=batch_first, stem=stem)
    x, y = first_step_task(12)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    expected = reference_profile(model, x, y, time_dim=1 if batch_first else 0)
    run = watched_probe(model, x, y, tmp_path, steps=2)
    profiles = run.through_time()
    assert list(profiles) == ["rnn"]
    # Two probe steps with the same batch and parameters (lr 0): both equal the reference.
    np.testing.assert_allclose(profiles["rnn"], np.stack([expected, expected]), rtol=1e-5)
    column = run.modules.index("rnn")
    ratio, decay, reach = summary(expected)
    np.testing.assert_allclose(run.series("time_first_to_last")[:, column], ratio, rtol=1e-4)
    np.testing.assert_allclose(run.series("time_decay")[:, column], decay, rtol=1e-4)
    np.testing.assert_array_equal(run.series("time_reach")[:, column], reach)
    other = run.modules.index("head")
    assert np.isnan(run.series("time_first_to_last")[:, other]).all()


def test_upstream_gradients_are_unchanged(tmp_path):
    """The alias at the recurrent input changes nothing that flows to the layers before it."""
    torch.manual_seed(0)
    model = ManyToOne("GRU", stem=True)
    x, y = first_step_task(10)
    plain = copy.deepcopy(model)
    nn.functional.cross_entropy(plain(x), y).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1):
        nn.functional.cross_entropy(model(x), y).backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        optimizer.step()
    assert not model.rnn._forward_pre_hooks and not model._forward_pre_hooks


def test_packed_sequences_are_profiled_per_time_step(tmp_path):
    torch.manual_seed(0)
    model = ManyToOne("LSTM")
    x, y = first_step_task(9, batch=4)
    lengths = torch.tensor([9, 7, 7, 3])

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = model.rnn, model.head

        def forward(self, x):
            packed = pack_padded_sequence(x, lengths, batch_first=True)
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    packed_model = Packed()
    x_ref = x.clone().requires_grad_()
    nn.functional.cross_entropy(copy.deepcopy(packed_model)(x_ref), y).backward()
    expected = x_ref.grad.square().sum(dim=(0, 2)).sqrt().numpy()
    run = watched_probe(packed_model, x, y, tmp_path)
    np.testing.assert_allclose(run.through_time()["rnn"][0], expected, rtol=1e-5)


def test_cells_called_per_time_step_are_profiled(tmp_path):
    torch.manual_seed(0)
    model = CellLoop()
    x, y = first_step_task(15)
    expected = reference_profile(model, x, y)
    assert expected.shape == (15,)
    run = watched_probe(model, x, y, tmp_path, steps=2)  # a second forward restarts the count
    np.testing.assert_allclose(run.through_time()["cell"], np.stack([expected] * 2), rtol=1e-5)


def train_first_step_task(model, steps, tmp_path, length, lr=1e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", flush_every=20) as w:
        for i in range(steps):
            x, y = first_step_task(length, seed=i)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
    return w.findings()


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_long_range_task_raises_vanishing_through_time(tmp_path, kind):
    torch.manual_seed(0)
    findings = train_first_step_task(ManyToOne(kind), 40, tmp_path, length=100)
    assert [(f.kind, f.layer) for f in findings] == [("vanishing", "rnn")]
    finding = findings[0]
    assert "through time" in finding.message and f"({kind})" in finding.message
    assert finding.step == 0 and finding.evidence["first_to_last"] < 1e-12
    assert 5 <= finding.evidence["reach_steps"] <= 30
    assert "truncated BPTT" in finding.remedy


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_short_sequences_raise_nothing(tmp_path, kind):
    torch.manual_seed(0)
    assert train_first_step_task(ManyToOne(kind), 60, tmp_path, length=5) == []


def test_recurrent_weights_above_one_raise_exploding_through_time(tmp_path):
    torch.manual_seed(0)
    model = ManyToOne("RNN")
    with torch.no_grad():  # spectral radius 2, small inputs: the state stays mostly unsaturated
        model.rnn.weight_hh_l0.copy_(2.0 * nn.init.orthogonal_(torch.empty(HIDDEN, HIDDEN)))
        model.rnn.weight_ih_l0.mul_(0.01)
    findings = train_first_step_task(model, 20, tmp_path, length=40, lr=1e-4)
    assert [(f.kind, f.layer) for f in findings] == [("exploding", "rnn")]
    assert "through time" in findings[0].message and findings[0].evidence["first_to_last"] >= 1e3
    assert "ClipNorm" in findings[0].remedy


def test_report_draws_the_gradient_through_time_only_for_recurrent_models(tmp_path):
    torch.manual_seed(0)
    # 40 steps: the finding waits for TIME_PATIENCE (4) probe steps of evidence
    train_first_step_task(ManyToOne("LSTM"), 40, tmp_path / "lstm", length=60)
    page = gw.report(tmp_path / "lstm" / "run", tmp_path / "lstm.html").read_text()
    assert 'id="chart-through_time"><figcaption>' in page
    assert "vanishing at layer <code>rnn</code>" in page and "through time" in page
    written = write_pngs(tmp_path / "lstm" / "run", tmp_path / "png")
    assert tmp_path / "png" / "through_time.png" in written
    feed_forward, linear = tmp_path / "mlp", nn.Linear(4, 2)
    with gw.watch(linear, run_dir=feed_forward) as w:
        linear(torch.randn(2, 4)).sum().backward()
        w.step()
    assert "chart-through_time" not in gw.report(feed_forward, tmp_path / "mlp.html").read_text()


def test_a_frozen_recurrent_encoder_is_not_profiled(tmp_path):
    """Tempts vanishing through time: a frozen GRU on 100 steps of plain data, a trained head.
    Its gradient through time is no part of training, so nothing is measured or raised."""
    torch.manual_seed(0)
    model = ManyToOne("GRU")
    model.rnn.requires_grad_(False)
    findings = train_first_step_task(model, 20, tmp_path, length=100)
    assert findings == []
    run = gw.open_run(tmp_path / "run")
    assert np.isnan(run.series("time_first_to_last")).all()
