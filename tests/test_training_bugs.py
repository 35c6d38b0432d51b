"""The bugs of training code, each in two broken recipes: gradwatch names the kind, the layer or
tensors, and nothing else; the plain-torch evidence of each bug is checked in the test. Then the
wrong findings that earlier versions raised on such runs, reproduced."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_zoo import learnable_batch, update
from torch import nn

import gradwatch as gw
from gradwatch.detect.precision import UNDERFLOW_FRAC
from gradwatch.stats.attention_calls import made_by
from gradwatch.stats.stale import CarriedGradients

STEPS = 60


def mlp(inputs: int = 16, width: int = 32, classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )  # fmt: skip


def cnn(channels: int = 3, classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )  # fmt: skip


def images(batch: int, generator: torch.Generator, size: int = 8) -> tuple:
    x = torch.randn(batch, 3, size, size, generator=generator)
    return x, (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()


def plain_step(model, optimizer, batch):
    """A step function: `batch()`, cross-entropy, a plain update."""

    def step(i):
        x, y = batch()
        loss = F.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    return step


def watched(model, optimizer, tmp_path, step, steps=STEPS, **options):
    """Run `step(i)` under gw.watch; (findings, run)."""
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", **options) as w:
        for i in range(steps):
            loss = step(i)
            if loss is not None:
                w.log(loss=loss)
    return w.findings(), gw.open_run(tmp_path / "run")


def kinds(findings) -> list[tuple[str, str]]:
    return sorted((f.kind, f.layer) for f in findings)


# ---- stale_gradients -----------------------------------------------------------------------------
def test_missing_zero_grad_is_named(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    carried = []

    def step(i):
        carried.append(
            all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        )
        x, y = learnable_batch(32, 16, 4, generator)
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # no zero_grad anywhere
        optimizer.step()
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert all(carried[1:])  # plain torch: .grad is never cleared
    assert kinds(findings) == [("stale_gradients", "")]
    assert findings[0].step == 10 and findings[0].evidence["stale_share"] > 0.8
    assert "zero_grad" in findings[0].remedy


def test_zero_grad_of_another_model_leaves_the_lstm_stale(tmp_path):
    torch.manual_seed(0)
    embed, lstm, head = nn.Embedding(12, 16), nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 12)

    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lstm, self.head = embed, lstm, head

        def forward(self, tokens):
            return self.head(self.lstm(self.embed(tokens))[0])

    model, teacher = LanguageModel(), copy.deepcopy(LanguageModel())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    text = torch.arange(120) % 7 + (torch.arange(120) // 7) % 3

    def step(i):
        tokens = torch.stack([text[(i + k) % 90 : (i + k) % 90 + 11] for k in range(4)])
        teacher.zero_grad()  # the bug: clears the wrong model
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert kinds(findings) == [("stale_gradients", "")]
    assert set(findings[0].evidence["tensors"]) >= {"embed.weight", "lstm.weight_hh_l0"}


# ---- no_gradient (and no false nonfinite from None gradients) ------------------------------------
def test_detached_activation_cuts_the_first_layer_off(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        hidden = model[1](model[0](x)).detach()  # the bug
        loss = F.cross_entropy(model[4](model[3](model[2](hidden))), y)
        update(optimizer, loss)
        return loss

    findings, run = watched(model, optimizer, tmp_path, step)
    assert model[0].weight.grad is None and model[2].weight.grad is not None  # plain torch
    assert kinds(findings) == [("no_gradient", "0")]  # and no `nonfinite`
    assert findings[0].evidence["called_in_forward"] is True
    assert np.all(run.series("grad_none")[:, run.tensors.index("0.weight")] == 1)


class UnusedBranch(nn.Module):
    """A CNN with a projection defined in __init__ but never called in forward."""

    def __init__(self):
        super().__init__()
        self.features = cnn()
        self.projection = nn.Linear(4, 4)

    def forward(self, x):
        return self.features(x)


def test_a_layer_never_called_has_no_gradient_and_no_false_nonfinite(tmp_path):
    torch.manual_seed(0)
    model = UnusedBranch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)

    step = plain_step(model, optimizer, lambda: images(16, generator))

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert model.projection.weight.grad is None  # plain torch
    # Before grad_none, the two None gradients read as NaN: "2 parameter tensors got non-finite
    # gradients", a nonfinite finding in a run where nothing is non-finite.
    assert kinds(findings) == [("no_gradient", "projection")]
    assert findings[0].evidence["called_in_forward"] is False


# ---- not_updated ---------------------------------------------------------------------------------
def test_head_replaced_after_the_optimizer_was_built(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model[4] = nn.Linear(32, 4)  # the bug: the optimizer still holds the old head
    initial = model[4].weight.detach().clone()
    generator = torch.Generator().manual_seed(1)

    step = plain_step(model, optimizer, lambda: learnable_batch(32, 16, 4, generator))

    with pytest.warns(UserWarning, match="not in the optimizer"):
        findings, _ = watched(model, optimizer, tmp_path, step)
    assert torch.equal(model[4].weight, initial) and model[4].weight.grad is not None
    assert kinds(findings) == [("not_updated", "4")]
    assert findings[0].evidence["in_optimizer"] is False


def test_optimizer_built_from_the_frozen_backbone(tmp_path):
    """The forum bug: the user froze the backbone and built the optimizer from it."""
    torch.manual_seed(0)
    backbone, head = cnn(classes=8), nn.Linear(8, 4)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.ReLU(), head)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-3)
    initial = head.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)

    step = plain_step(model, optimizer, lambda: images(16, generator))

    with pytest.warns(UserWarning, match="only frozen parameters"):
        findings, _ = watched(model, optimizer, tmp_path, step)  # watched, not refused
    assert torch.equal(head.weight, initial)
    assert kinds(findings) == [("not_updated", "2")]
    assert "none of the model's trainable parameters" in findings[0].message


# ---- probabilities_as_logits ---------------------------------------------------------------------
def test_softmax_before_cross_entropy(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(mlp(), nn.Softmax(dim=-1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        probabilities = model(x)
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(32))  # plain torch
        loss = F.cross_entropy(probabilities, y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert kinds(findings) == [("probabilities_as_logits", "")]
    assert findings[0].evidence["prob_share"] == 1.0


def test_sigmoid_before_bce_with_logits_in_a_cnn(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(cnn(classes=1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = images(16, generator)
        out = model(x).squeeze(1)
        assert bool(((out > 0) & (out < 1)).all())  # plain torch
        loss = F.binary_cross_entropy_with_logits(out, (y % 2).float())
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert kinds(findings) == [("probabilities_as_logits", "1")]


# ---- clip_always ---------------------------------------------------------------------------------
def test_clip_guard_threshold_below_every_norm(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    norms = []

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            )
        )
        optimizer.step()
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step, guards=[gw.guards.ClipNorm(0.01)])
    assert np.mean(np.array(norms) > 0.01) >= 0.9  # plain torch: the clip acts every step
    assert kinds(findings) == [("clip_always", "")]
    assert findings[0].evidence["clipped_to"] == pytest.approx(0.01, rel=1e-3)


def test_users_own_clip_grad_norm_that_always_acts(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 16), nn.LSTM(16, 16, batch_first=True))
    head = nn.Linear(16, 12)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    text = torch.arange(120) % 7 + (torch.arange(120) // 7) % 3
    clipped = []

    def step(i):
        tokens = torch.stack([text[(i + k) % 90 : (i + k) % 90 + 11] for k in range(4)])
        logits = head(model(tokens[:, :-1])[0])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        clipped.append(float(total) > 0.05)
        optimizer.step()
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert np.mean(clipped) >= 0.9  # plain torch: clip_grad_norm_ found a larger norm
    assert kinds(findings) == [("clip_always", "")]
    assert findings[0].evidence["clipped_to"] == pytest.approx(0.05, rel=1e-3)


# ---- learning_rate -------------------------------------------------------------------------------
def first_update_ratio(model, optimizer, batch) -> float:
    """Median ‖Δθ‖/‖θ‖ of the weight matrices over one plain step, on a copy."""
    model, optimizer_copy = copy.deepcopy(model), type(optimizer)
    optimizer = optimizer_copy(model.parameters(), **optimizer.defaults)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    before = [w.detach().clone() for w in weights]
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    return float(
        np.median(
            [((w - b).norm() / b.norm()).item() for w, b in zip(weights, before, strict=True)]
        )
    )


def test_learning_rate_far_too_large_for_adam(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.3)
    generator = torch.Generator().manual_seed(1)
    assert first_update_ratio(model, optimizer, learnable_batch(32, 16, 4, generator)) > 1

    step = plain_step(model, optimizer, lambda: learnable_batch(32, 16, 4, generator))

    findings, _ = watched(model, optimizer, tmp_path, step)
    found = [f for f in findings if f.kind == "learning_rate"]
    assert len(found) == 1 and found[0].step == 0
    assert found[0].evidence["direction"] == "too_large"
    # What the too-large rate did next (units killed) may be named too, never as the cause.
    assert {f.kind for f in findings} <= {"learning_rate", "dead_units", "vanishing"}


def test_learning_rate_far_too_small_for_sgd_on_a_cnn(tmp_path):
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-7)
    generator = torch.Generator().manual_seed(1)
    assert first_update_ratio(model, optimizer, images(16, generator)) < 1e-6

    step = plain_step(model, optimizer, lambda: images(16, generator))

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert kinds(findings) == [("learning_rate", "")]
    assert findings[0].evidence["direction"] == "too_small" and findings[0].step == 0


# ---- input_scale ---------------------------------------------------------------------------------
def test_features_at_scales_a_thousand_apart(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    scale = torch.logspace(0, 3, 16)  # age next to income, as a table gives them

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        loss = F.cross_entropy(model(x * scale), y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    x = learnable_batch(512, 16, 4, torch.Generator().manual_seed(2))[0] * scale
    rms = x.square().mean(dim=0).sqrt()
    assert rms.max() / rms.min() > 100  # plain torch
    assert kinds(findings) == [("input_scale", "0")]
    assert findings[0].evidence["spread"] == pytest.approx(float(rms.max() / rms.min()), rel=0.3)


def test_raw_pixel_values_into_a_cnn(tmp_path):
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = images(16, generator)
        pixels = ((x * 40 + 128).clamp(0, 255)).round()  # 0..255, not scaled to [0, 1]
        loss = F.cross_entropy(model(pixels), y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    sample = ((images(16, torch.Generator().manual_seed(3))[0] * 40 + 128).clamp(0, 255)).round()
    assert sample.square().mean(dim=(0, 2, 3)).sqrt().max() > 30  # plain torch
    assert kinds(findings) == [("input_scale", "0")]


# ---- batchnorm_small_batch -----------------------------------------------------------------------
def test_batchnorm1d_on_batches_of_four(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(4, 16, 4, generator)
        loss = F.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    x = learnable_batch(4, 16, 4, generator)[0]
    normalised = F.batch_norm(model[0](x), None, None, training=True)
    assert normalised.abs().max() <= 3**0.5 + 1e-4  # plain torch: bounded by √(n − 1)
    assert kinds(findings) == [("batchnorm_small_batch", "1")]
    assert findings[0].evidence["values_per_channel"] == 4


def test_batchnorm2d_on_two_tiny_feature_maps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = images(2, generator, size=4)  # 2 images, 2x2 feature maps: 8 values a channel
        loss = F.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step)
    assert model[0](images(2, generator, size=4)[0]).shape[2:] == (2, 2)  # plain torch
    assert kinds(findings) == [("batchnorm_small_batch", "1")]
    assert findings[0].evidence["values_per_channel"] == 8


# ---- symmetric_weights ---------------------------------------------------------------------------
def test_constant_init_of_an_mlp(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            nn.init.constant_(layer.weight, 0.05)
            nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    step = plain_step(model, optimizer, lambda: learnable_batch(32, 16, 4, generator))

    findings, _ = watched(model, optimizer, tmp_path, step)
    rows = model[0].weight.detach()
    assert torch.allclose(rows, rows[0].expand_as(rows))  # plain torch: the units stayed equal
    assert kinds(findings) == [("symmetric_weights", "0")]


def test_constant_init_of_a_conv_layer(tmp_path):
    torch.manual_seed(0)
    model = cnn()
    with torch.no_grad():  # both convs constant, weights and biases (random ones separate units)
        for conv in (model[0], model[2]):
            conv.weight.fill_(0.1)
            conv.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)

    step = plain_step(model, optimizer, lambda: images(16, generator))

    findings, _ = watched(model, optimizer, tmp_path, step)
    filters = model[0].weight.detach().flatten(1)
    assert torch.allclose(filters, filters[0].expand_as(filters))  # plain torch
    assert kinds(findings) == [("symmetric_weights", "0")]


# ---- wrong findings of earlier versions, reproduced ----------------------------------------------
def test_auxiliary_head_used_on_some_steps_raises_nothing(tmp_path):
    """Its parameters have no gradient on odd steps: None is not NaN (was a false nonfinite)."""
    torch.manual_seed(0)
    trunk, head, aux = (
        nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
        nn.Linear(32, 4),
        nn.Linear(32, 4),
    )
    model = nn.ModuleDict({"trunk": trunk, "head": head, "aux": aux})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        h = trunk(x)
        loss = F.cross_entropy(head(h), y)
        if i % 2 == 0:
            loss = loss + 0.3 * F.cross_entropy(aux(h), y)
        update(optimizer, loss)
        return loss

    findings, run = watched(model, optimizer, tmp_path, step)
    assert aux.weight.grad is None  # plain torch, after an odd step
    assert np.all(run.series("grad_none")[1::2, run.tensors.index("aux.weight")] == 1)
    assert findings == []


def test_adam_epsilon_ignores_entries_whose_gradient_is_always_zero(tmp_path):
    """Input pixels blank in every image leave their weight columns without any gradient: ε
    does not dominate them (was a false adam_epsilon on '0.weight')."""
    torch.manual_seed(0)
    model = mlp(inputs=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    blank = torch.ones(64)
    blank[16:] = 0  # 75% of the pixels are blank in every image

    def step(i):
        x, y = learnable_batch(32, 64, 4, generator)
        loss = F.cross_entropy(model(x * blank), y)
        update(optimizer, loss)
        return loss

    findings, run = watched(model, optimizer, tmp_path, step)
    assert (model[0].weight.grad[:, 16:] == 0).all()  # plain torch
    assert np.nanmax(run.series("adam_eps_frac")[:, run.tensors.index("0.weight")]) < 0.5
    assert findings == []


def test_bf16_bag_of_words_zeros_are_not_underflow(tmp_path):
    """The absent words' columns are exact zeros in fp32 too (was a false underflow, 91%)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(500, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    sentiment = torch.randn(500, generator=torch.Generator().manual_seed(3))

    def bag(i):
        words = torch.randint(0, 500, (32, 6), generator=generator)
        x = torch.zeros(32, 500).scatter_(1, words, 1.0)
        return x, (sentiment[words].sum(dim=1) > 0).long()

    def step(i):
        x, y = bag(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    findings, _ = watched(model, optimizer, tmp_path, step, histogram_every=1)
    reference = copy.deepcopy(model)
    x, y = bag(0)
    F.cross_entropy(reference(x), y).backward()
    zeros = (reference[0].weight.grad == 0).float().mean()
    assert zeros >= UNDERFLOW_FRAC  # fp32 has the same zeros: the old rule named them
    assert findings == []


# ---- underflow of a whole fp16 model without a loss scale ----------------------------------------
def fp16_run(tmp_path, half: bool, loss_weight: float):
    torch.manual_seed(0)
    model = mlp(width=64)
    if half:
        model = model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(256, 16, 4, generator)
        if half:
            loss = F.cross_entropy(model(x.half()).float(), y) * loss_weight
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y) * loss_weight
        optimizer.zero_grad()
        loss.backward()  # no GradScaler
        optimizer.step()
        return loss

    return watched(model, optimizer, tmp_path, step, steps=30, probe_every=5, histogram_every=1)


@pytest.mark.parametrize(
    ("half", "loss_weight"),
    [(True, 1e-3), (False, 1e-5)],
    ids=["fp16 parameters, loss weight 1e-3", "fp16 autocast, loss weight 1e-5"],
)
def test_whole_fp16_model_without_a_loss_scale(tmp_path, half, loss_weight):
    """A small loss weight (an auxiliary loss, a mean over many outputs) makes gradients that
    fp16 cannot hold; the rule that a tensor must lose more than the median silenced this."""
    findings, run = fp16_run(tmp_path, half, loss_weight)
    edges, counts = run.histogram("grad_hist")
    normal = np.searchsorted(edges, np.log10(6.103515625e-05), side="right") - 1
    lost = (counts[0, :, 0] + (counts[0, :, 1:normal].sum(axis=1) if half else 0)) / counts[0].sum(
        1
    )
    assert np.median(lost) >= 0.5  # the histogram: most entries are 0 or below fp16's normal
    torch.manual_seed(0)
    reference = mlp(width=64)  # fp32, same weights and batch: nothing is lost there
    x, y = learnable_batch(256, 16, 4, torch.Generator().manual_seed(1))
    (F.cross_entropy(reference(x), y) * loss_weight).backward()
    grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert (grads == 0).float().mean() < 0.1
    assert kinds(findings) == [("underflow", "")]
    assert "GradScaler" in findings[0].remedy


def test_carried_gradients_read_what_was_in_grad_sparse_included():
    """The hook sees `.grad` before autograd adds to it: None on a step's first backward after
    zeroing, the earlier steps' sum when nothing cleared it (a sparse gradient by its values)."""
    embedding = nn.Embedding(10, 4, sparse=True)
    carried = CarriedGradients([embedding.weight], torch.device("cpu"))
    carried.arm()
    embedding(torch.tensor([1, 2])).sum().backward()
    assert carried.take().item() == 0  # .grad was None
    before = embedding.weight.grad.to_dense().norm()
    carried.arm()  # the next step, nothing cleared .grad
    embedding(torch.tensor([3])).sum().backward()
    assert carried.take().item() == pytest.approx(before.item())
    assert not embedding.weight._backward_hooks  # take() unhooks


def test_only_a_sigmoid_seen_through_reshapes_makes_bce_input_probabilities():
    z = torch.randn(4, 3, requires_grad=True)
    assert made_by(torch.sigmoid(z).flatten().unsqueeze(0), "SigmoidBackward0") == 1.0
    assert made_by(torch.tanh(torch.sigmoid(z)), "SigmoidBackward0") == 0.0  # not a reshape
    assert made_by(torch.sigmoid(z) * 2, "SigmoidBackward0") == 0.0
    assert made_by(z.detach(), "SigmoidBackward0") == 0.0
