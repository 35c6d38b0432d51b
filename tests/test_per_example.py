"""Per-example gradient norms equal those of torch.func's per-example gradients (vmap over the
examples of ∇ℓ_i), for every rule and the fallback, and leave the model as they found it."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import gradwatch as gw


def cross_entropy(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.flatten(0, -2), targets.flatten())


def reference(model, loss_of, inputs, targets, batch_dim=0, loop=False):
    """{name: [B]} norms of ∇ℓ_i from materialised per-example gradients: ℓ_i is `loss_of` on
    example i alone (a batch of one)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def example_loss(p, x, t):
        out = functional_call(model, (p, buffers), (x.unsqueeze(batch_dim),))
        return loss_of(out, t.unsqueeze(0))

    if loop:  # vmap cannot run some modules (nn.LSTM)
        rows = [
            grad(example_loss)(params, inputs.select(batch_dim, i), targets[i])
            for i in range(len(targets))
        ]
        grads = {n: torch.stack([r[n] for r in rows]) for n in params}
    else:
        grads = vmap(grad(example_loss), in_dims=(None, batch_dim, 0))(params, inputs, targets)
    return {n: g.flatten(1).norm(dim=1) for n, g in grads.items()}


def check(model, inputs, targets, loss_of=cross_entropy, batch_dim=0, loop=False):
    """gw.per_example_grad_norms equals the reference, per tensor and in total (rtol 1e-4)."""
    expected = reference(model, loss_of, inputs, targets, batch_dim, loop)
    found = gw.per_example_grad_norms(
        model, lambda out: loss_of(out, targets), inputs, batch_dim=batch_dim
    )
    assert found.skipped == {}
    assert set(found.per_tensor) == set(expected)
    for name, norms in expected.items():
        torch.testing.assert_close(found.per_tensor[name], norms, rtol=1e-4, atol=1e-8, msg=name)
    total = torch.stack([n.square() for n in expected.values()]).sum(0).sqrt()
    torch.testing.assert_close(found.total, total, rtol=1e-4, atol=1e-8)
    return found


def test_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    check(model, torch.randn(8, 6), torch.randint(0, 3, (8,)))


def test_cnn_with_conv2d_conv1d_and_batchnorm_in_eval_mode():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
            self.norm = nn.BatchNorm2d(8)
            self.line = nn.Conv1d(8, 4, 3, dilation=2)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.norm(self.conv(x)))  # [B, 8, 5, 5]
            h = self.line(h.flatten(2))  # [B, 4, 21]
            return self.head(h.mean(dim=2))

    model = Net()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    check(model, torch.randn(6, 3, 10, 10), torch.randint(0, 3, (6,)))


class TinyTransformer(nn.Module):
    """Embedding, a learned positional embedding owned by the root, LayerNorm, GroupNorm (batch
    first only), nn.MultiheadAttention (inside TransformerEncoderLayer) and a Linear head."""

    def __init__(self, vocab=11, width=16, steps=7, batch_first=True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(steps, width) * 0.1)
        self.layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=batch_first)
        self.group = nn.GroupNorm(4, width)
        self.head = nn.Linear(width, vocab)
        self.batch_first = batch_first

    def forward(self, tokens):
        position = self.position if self.batch_first else self.position[:, None]
        h = self.layer(self.embed(tokens) + position)
        if self.batch_first:  # GroupNorm over [B, C, T]
            h = self.group(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def test_transformer_with_embedding_layernorm_and_multihead_attention():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (5, 7))
    tokens[:, -2:] = 0  # padding
    check(TinyTransformer(), tokens, torch.randint(0, 11, (5, 7)))


def test_sequence_first_layout_with_batch_dim_1():
    torch.manual_seed(0)
    model = TinyTransformer(batch_first=False)
    tokens = torch.randint(1, 11, (7, 4))  # [T, B]

    def loss_of(out, targets):  # out [T, B, V]; targets [B, T]
        return nn.functional.cross_entropy(out.transpose(0, 1).flatten(0, 1), targets.flatten())

    check(model, tokens, torch.randint(0, 11, (4, 7)), loss_of=loss_of, batch_dim=1)


@pytest.mark.parametrize(("steps", "width"), [(3, 32), (40, 4)])
def test_linear_on_sequences_both_branches(steps, width):
    """T² ≤ d_in·d_out uses the Gram matrices (3² ≤ 32·32), else per-example gradients
    (40² > 4·4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
    check(model, torch.randn(5, steps, width), torch.randint(0, 3, (5, steps)))


def test_lstm_through_the_fallback_one_example_at_a_time():
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    with pytest.warns(UserWarning, match="no ghost-norm rule for LSTM"):
        check(Tagger(), torch.randn(4, 6, 4), torch.randint(0, 3, (4, 6)), loop=True)


def test_sum_reduction_and_a_masked_loss():
    """With reduction="sum" ∇ℓ_i is the example's contribution; a mask counts what it counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    summed = gw.per_example_grad_norms(
        model, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"), x, reduction="sum"
    )
    mean = gw.per_example_grad_norms(model, lambda out: nn.functional.cross_entropy(out, y), x)
    torch.testing.assert_close(summed.total, mean.total)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])

    def masked(out):
        return (nn.functional.cross_entropy(out, y, reduction="none") * mask).sum()

    found = gw.per_example_grad_norms(model, masked, x, reduction="sum")
    assert (found.total[mask == 0] == 0).all()
    torch.testing.assert_close(found.total[mask == 1], mean.total[mask == 1])


def test_the_model_is_left_as_it_was_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="BatchNorm1d in training mode"):
        gw.per_example_grad_norms(model, lambda out: nn.functional.cross_entropy(out, y), x)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=name)  # running statistics too
    assert all(not m._forward_hooks for m in model.modules())


def test_unused_parameters_have_zero_norms_and_unreached_ones_are_skipped():
    class Borrowing(nn.Module):
        """Uses `inner.weight` without calling `inner`; `unused` is never used."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return x @ self.inner.weight.T

    found = gw.per_example_grad_norms(Borrowing(), lambda out: out.sum(), torch.randn(4, 3))
    assert set(found.skipped) == {"inner.weight"}
    assert "used outside a forward call of its module" in found.skipped["inner.weight"]
    assert torch.isnan(found.total).all()
    for name in ("unused.weight", "unused.bias", "inner.bias"):
        assert (found.per_tensor[name] == 0).all()


def test_bad_input_is_refused_clearly():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match='reduction must be "mean" or "sum"'):
        gw.per_example_grad_norms(model, lambda out: out.sum(), torch.randn(2, 3), reduction="x")
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        gw.per_example_grad_norms(model, lambda out: out, torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs a tensor input with a batch axis"):
        gw.per_example_grad_norms(model, lambda out: out.sum(), 3.0)


def watch_steps(model, batches, tmp_path, loss_of=cross_entropy, lr=0.0, **options):
    """Train on `batches` [(x, y) or a list of micro-batches] under gw.watch(per_example=True,
    probe every step); the run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "run", probe_every=1, per_example=True, **options
    ) as w:
        for batch in batches:
            micro = batch if isinstance(batch, list) else [batch]
            optimizer.zero_grad()
            for x, y in micro:
                (loss_of(model(x), y) / len(micro)).backward()
            optimizer.step()
    return gw.open_run(w.run_dir), w


def explicit_noise_scale(per_example: dict[str, torch.Tensor]) -> float:
    """B_simple from materialised per-example gradients {name: [B, ...]} (McCandlish et al.)."""
    flat = torch.cat([g.flatten(1) for g in per_example.values()], dim=1).double()
    batch = flat.shape[0]
    small = flat.square().sum(dim=1).mean()
    big = flat.mean(dim=0).square().sum()
    square = (batch * big - small) / (batch - 1)
    trace = (small - big) / (1 - 1 / batch)
    return float(trace / square)


def per_example_grads(model, inputs, targets):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(p, x, t):
        return cross_entropy(functional_call(model, p, (x[None],)), t[None])

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def test_watch_records_per_example_quantiles_and_the_noise_scale(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    grads = per_example_grads(model, x, y)  # lr 0: the same gradients at every step
    run, _ = watch_steps(model, [(x, y)] * 6, tmp_path)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for i, name in enumerate(run.tensors):
        norms = grads[name].flatten(1).norm(dim=1)
        expected = [norms.quantile(0.5), norms.quantile(0.95), norms.max()]
        for stat, value in zip(
            ("pe_norm_p50", "pe_norm_p95", "pe_norm_max"), expected, strict=True
        ):
            torch.testing.assert_close(
                torch.tensor(run.series(stat)[:, i]), value.expand(6), rtol=1e-4, atol=0
            )
    totals = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
    torch.testing.assert_close(
        torch.tensor(run.series("pe_total_max")), totals.max().expand(6), rtol=1e-4, atol=0
    )
    assert (run.series("pe_total_argmax") == int(totals.argmax())).all()
    assert (run.series("pe_examples") == 24).all()
    noise = run.series("gns_simple")
    assert np.isnan(noise[:3]).all()  # warm-up
    np.testing.assert_allclose(noise[3:], explicit_noise_scale(grads), rtol=1e-4)


def test_gradient_accumulation_counts_each_micro_batch_as_other_examples(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = per_example_grads(model, x, y)
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]
    run, _ = watch_steps(model, [micro] * 2, tmp_path)
    assert (run.series("pe_examples") == 16).all()
    totals = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
    np.testing.assert_allclose(run.series("pe_total_max"), float(totals.max()), rtol=1e-4)
    np.testing.assert_allclose(run.series("pe_total_p50"), float(totals.quantile(0.5)), rtol=1e-4)


def test_a_corrupted_example_is_named_and_a_normal_run_raises_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    rule = torch.randn(6, 3)
    generator = torch.Generator().manual_seed(1)

    def batch(corrupt: bool):
        x = torch.randn(32, 6, generator=generator)
        y = (x @ rule).argmax(dim=1)
        if corrupt:
            x[5] *= 1000.0  # a broken sensor reading
        return x, y

    _, healthy = watch_steps(model, [batch(False) for _ in range(30)], tmp_path / "a", lr=0.05)
    assert healthy.findings() == []
    _, sick = watch_steps(
        copy.deepcopy(model), [batch(i == 12) for i in range(30)], tmp_path / "b", lr=0.05
    )
    # (the corrupted step wrecks the model, so batch_size may follow: not this test's concern)
    (finding,) = [f for f in sick.findings() if f.kind == "outlier_examples"]
    assert finding.evidence["occurrences"][0]["step"] == 12
    assert finding.evidence["occurrences"][0]["index"] == 5


def test_a_batch_far_below_the_noise_scale_raises_batch_size(tmp_path):
    """Labels that are pure noise: the per-example gradients disagree, B_simple is large."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(30)
    ]
    _, w = watch_steps(model, batches, tmp_path, lr=0.01)
    kinds = [f.kind for f in w.findings()]
    assert kinds == ["batch_size"], kinds
    finding = w.findings()[0]
    assert "far below" in finding.message and finding.evidence["batch"] == 8
    assert finding.evidence["b_simple"] >= 80


def test_per_example_is_checked_at_watch(tmp_path):
    with pytest.raises(ValueError, match="per_example must be False, True"):
        gw.watch(nn.Linear(2, 2), run_dir=tmp_path / "run", per_example="max")


def test_report_draws_per_example_norms_and_the_noise_scale(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    _, w = watch_steps(model, [(x, y)] * 8, tmp_path, lr=0.01)
    page = gw.report(w.run_dir, tmp_path / "report.html").read_text()
    assert 'id="chart-per_example"><figcaption>' in page
    plain = tmp_path / "plain"
    with gw.watch(model, run_dir=plain) as watcher:
        model(x).sum().backward()
        watcher.step()
    assert "chart-per_example" not in gw.report(plain, tmp_path / "plain.html").read_text()


def test_watch_covers_fallback_modules_without_recording_their_replays(tmp_path):
    """The root-owned positional embedding goes through the torch.func fallback, which re-runs
    the whole model: gradwatch's own probes must not record that replay (it used to fail)."""
    torch.manual_seed(0)
    model = TinyTransformer()
    tokens, targets = torch.randint(1, 11, (4, 7)), torch.randint(0, 11, (4, 7))
    expected = reference(model, cross_entropy, tokens, targets)
    totals = torch.stack([n.square() for n in expected.values()]).sum(0).sqrt()
    with warnings.catch_warnings():  # the fallback's once-warning, torch.func's
        warnings.simplefilter("ignore")
        run, _ = watch_steps(model, [(tokens, targets)] * 2, tmp_path)
    np.testing.assert_allclose(run.series("pe_total_max"), float(totals.max()), rtol=1e-4)
    assert np.isfinite(run.series("signal_norm")).any()  # the probes still recorded the step


def test_a_fallback_module_with_dropout_in_training_is_skipped_not_replayed():
    """A module without a rule that holds a dropout: a replay example by example would draw new
    masks, not the step's."""
    torch.manual_seed(0)

    class Gated(nn.Module):  # owns a parameter, has no rule, drops out inside
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.randn(8))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.gate)

    def forward_loss(out):
        return out.square().mean()

    x = torch.randn(3, 8)
    found = gw.per_example_grad_norms(Gated(), forward_loss, x)
    assert set(found.skipped) == {"gate"}
    assert "Dropout(p=0.5)" in found.skipped["gate"]
    assert torch.isnan(found.total).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = gw.per_example_grad_norms(Gated().eval(), forward_loss, x)
    assert evaluated.skipped == {} and torch.isfinite(evaluated.total).all()


class DropoutAttention(nn.Module):
    """nn.MultiheadAttention with attention dropout in each of the ways torch's forward takes:
    self-attention (one packed projection) or cross-attention (key is value) or three inputs;
    need_weights on (softmax, dropout, bmm) or off (scaled_dot_product_attention); masks;
    batch or sequence first. Then a TransformerEncoderLayer with dropout 0.1 everywhere."""

    def __init__(self, inputs: str, need_weights: bool, batch_first: bool) -> None:
        super().__init__()
        self.inputs, self.need_weights, self.batch_first = inputs, need_weights, batch_first
        self.embed = nn.Embedding(11, 16)
        self.attention = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=batch_first)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(16, 11)

    def forward(self, tokens):
        h = self.embed(tokens)  # [B, T, 16] or [T, B, 16]
        padding = (tokens == 0) if self.batch_first else (tokens == 0).T
        steps = h.shape[1] if self.batch_first else h.shape[0]
        causal = torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1)
        key = value = h
        if self.inputs != "self":
            key = h.roll(1, dims=1 if self.batch_first else 0)
            value = key if self.inputs == "cross" else key * 0.5
        out, _ = self.attention(
            h, key, value, key_padding_mask=padding, attn_mask=causal,
            need_weights=self.need_weights,
        )  # fmt: skip
        return self.head(self.layer(out + h))


@pytest.mark.parametrize(
    ("inputs", "need_weights", "batch_first"),
    [("self", False, True), ("self", True, True), ("cross", False, False), ("three", True, False)],
)
def test_attention_dropout_norms_equal_per_example_gradients_with_the_steps_masks(
    inputs, need_weights, batch_first
):
    """Attention dropout on: the norms equal per-example gradients ∇ℓ_i, one backward per
    example through one forward of torch's own nn.MultiheadAttention; the same seed draws the
    same dropout masks in both forwards (the equal losses show it), so these are the gradients
    of the step gradwatch saw. (Not torch.func: under its transforms the same seed draws other
    masks, its forward differs from the plain one by 0.18.)"""
    torch.manual_seed(0)
    model = DropoutAttention(inputs, need_weights, batch_first).train()
    tokens = torch.randint(1, 11, (5, 6))
    tokens[1:, -2:] = 0
    targets = torch.randint(0, 11, (5, 6))
    batch_dim = 0 if batch_first else 1
    tokens_in = tokens if batch_first else tokens.T
    params = dict(model.named_parameters())

    def example_losses(out):
        out = out if batch_first else out.transpose(0, 1)
        return nn.functional.cross_entropy(out.transpose(1, 2), targets, reduction="none").mean(1)

    torch.manual_seed(1)
    losses = example_losses(model(tokens_in))
    rows = [torch.autograd.grad(loss, list(params.values()), retain_graph=True) for loss in losses]
    expected = {
        n: torch.stack([r[k] for r in rows]).flatten(1).norm(dim=1) for k, n in enumerate(params)
    }
    seen = []

    def loss_fn(out):
        seen.append(example_losses(out).detach())
        return seen[-1].new_zeros(()) + example_losses(out).mean()

    torch.manual_seed(1)
    found = gw.per_example_grad_norms(model, loss_fn, tokens_in, batch_dim=batch_dim)
    torch.testing.assert_close(seen[0], losses.detach())  # the same masks
    assert found.skipped == {}
    for name, norms in expected.items():
        torch.testing.assert_close(found.per_tensor[name], norms, rtol=1e-4, atol=1e-8, msg=name)
    assert type(model.attention) is nn.MultiheadAttention  # the swap is undone


def test_watch_records_the_steps_own_norms_under_attention_dropout(tmp_path):
    """gw.watch(per_example=True) on a model with attention dropout: no tensor left out, and
    the probe step's norms are those of the step itself (per-example gradients through one
    forward of torch's own modules under the same seed, as above)."""
    torch.manual_seed(0)
    model = DropoutAttention("self", False, True).train()
    tokens = torch.randint(1, 11, (6, 5))
    targets = torch.randint(0, 11, (6, 5))
    params = dict(model.named_parameters())
    torch.manual_seed(3)
    out = model(tokens)
    losses = nn.functional.cross_entropy(out.transpose(1, 2), targets, reduction="none").mean(1)
    rows = [torch.autograd.grad(loss, list(params.values()), retain_graph=True) for loss in losses]
    totals = torch.stack([sum(g.square().sum() for g in row) for row in rows]).sqrt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(3)
        run, _ = watch_steps(model, [(tokens, targets)], tmp_path)
    assert not [w for w in caught if "gradwatch" in str(w.message)]  # none left out
    np.testing.assert_allclose(run.series("pe_total_max"), [float(totals.max())], rtol=1e-4)
    median = float(torch.quantile(totals, 0.5))
    np.testing.assert_allclose(run.series("pe_total_p50"), [median], rtol=1e-4)
    assert run.series("pe_total_argmax")[0] == int(totals.argmax())
    assert np.isfinite(run.series("pe_norm_max")).all()


def test_multihead_attention_watched_as_the_root_module():
    """The attention module itself as the model (its name is ""): its in-projection and
    out_proj are found under their own names."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True)
    x = torch.randn(3, 4, 8)
    params = dict(attention.named_parameters())
    torch.manual_seed(1)
    losses = attention(x, x, x)[0].square().mean(dim=(1, 2))
    rows = [torch.autograd.grad(loss, list(params.values()), retain_graph=True) for loss in losses]
    torch.manual_seed(1)
    found = gw.per_example_grad_norms(attention, lambda out: out[0].square().mean(), x, x, x)
    assert found.skipped == {}
    for k, name in enumerate(params):
        expected = torch.stack([row[k].norm() for row in rows])
        torch.testing.assert_close(found.per_tensor[name], expected, rtol=1e-4, atol=1e-8)


def test_a_failed_capture_set_up_leaves_no_swapped_class_or_hook(monkeypatch):
    from gradwatch.stats.example_capture import Capture

    model = DropoutAttention("self", False, True)
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def refuse(*args, **kwargs):
        raise RuntimeError("no more hooks")

    monkeypatch.setattr(nn.Linear, "register_forward_hook", refuse)  # after the swap
    with pytest.raises(RuntimeError, match="no more hooks"):
        Capture(model)
    assert type(model.attention) is nn.MultiheadAttention
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == before


def test_a_fault_in_the_written_out_attention_never_breaks_the_step(tmp_path, monkeypatch, caplog):
    """gradwatch's own fault inside the written-out attention: torch's forward gives the step's
    output, the watcher stops watching and says why; the user's own bad argument still gets
    torch's error, and the watcher is not blamed."""
    from gradwatch.stats import captured_attention

    torch.manual_seed(0)
    model = DropoutAttention("self", False, True).eval()  # no dropout: outputs comparable
    tokens = torch.randint(1, 11, (4, 5))
    expected = model(tokens)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("an injected fault in gradwatch")

    monkeypatch.setattr(captured_attention, "_projected", broken)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1, per_example=True):
        torch.testing.assert_close(model(tokens), expected)
    reports = [r.getMessage() for r in caplog.records if "goes on unwatched" in r.getMessage()]
    assert len(reports) == 1 and "an injected fault in gradwatch" in reports[0]
    monkeypatch.undo()
    caplog.clear()
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    with gw.watch(attention, run_dir=tmp_path / "user", per_example=True) as w:
        x = torch.randn(2, 3, 16)
        with pytest.raises(RuntimeError):  # an attn_mask of the wrong shape: torch's own error
            attention(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
        attention(x, x, x)[0].sum().backward()
        w.step()
    assert not [r for r in caplog.records if "goes on unwatched" in r.getMessage()]


def test_captured_attention_is_torchs_own_class_in_copies_and_pickles(tmp_path):
    import pickle

    from gradwatch.stats.example_capture import Capture

    model = DropoutAttention("self", False, True)
    capture = Capture(model)
    try:
        assert type(model.attention) is not nn.MultiheadAttention  # swapped while capturing
        assert type(copy.deepcopy(model).attention) is nn.MultiheadAttention
        assert type(pickle.loads(pickle.dumps(model.attention))) is nn.MultiheadAttention
    finally:
        capture.remove()
    assert type(model.attention) is nn.MultiheadAttention


def test_conv_with_few_positions_uses_the_gram_branch():
    """L² ≤ C_in·k·C_out (4² ≤ 72·8): the Gram matrices of the unfolded patches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
    check(model, torch.randn(5, 8, 2, 2), torch.randint(0, 3, (5,)))


class MaskedAttention(nn.Module):
    """Self-attention under a causal mask and a key padding mask derived from the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 11)

    def forward(self, tokens):
        h = self.embed(tokens)
        steps = tokens.shape[1]
        causal = torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1)
        out, _ = self.attention(
            h, h, h, key_padding_mask=tokens == 0, attn_mask=causal, need_weights=False
        )
        return self.head(out)


def test_multihead_attention_rule_with_causal_and_padding_masks():
    torch.manual_seed(0)
    tokens = torch.randint(1, 11, (4, 6))
    tokens[1:, -2:] = 0  # padding at the end of three examples
    check(MaskedAttention(), tokens, torch.randint(0, 11, (4, 6)))
