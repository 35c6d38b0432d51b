"""Healthy recipes people really train, each short enough for CI: gradwatch's defaults must raise
no finding on any of them. Several are built to tempt a detector (named in each docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw

STEPS = 80


def learnable_batch(batch: int, features: int, classes: int, generator: torch.Generator):
    """Inputs and labels that a fixed random linear rule links, so training makes progress."""
    rule = torch.randn(features, classes, generator=torch.Generator().manual_seed(7))
    x = torch.randn(batch, features, generator=generator)
    return x, (x @ rule).argmax(dim=1)


def watch_training(model, optimizer, tmp_path, step, steps=STEPS, **watch_options):
    """Run `step(i)` (which does forward, backward and the update) under gw.watch defaults;
    returns the findings."""
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", **watch_options) as w:
        for i in range(steps):
            loss = step(i)
            if loss is not None:
                w.log(loss=loss)
    return w.findings()


def sampled_step(model, optimizer, x, y, generator, batch: int = 64):
    """A step function: a random batch of the data set (x, y), cross-entropy, a plain update."""

    def step(i):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        update(optimizer, loss)
        return loss

    return step


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One plain update from `loss`."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def test_residual_cnn_with_batchnorm_and_sgd_momentum(tmp_path):
    """Tempts dead_units (ReLUs after BatchNorm) and vanishing (a deep conv stack)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        *[ResidualBlock(16) for _ in range(3)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x = torch.randn(16, 3, 12, 12, generator=generator)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
        loss = nn.functional.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    assert watch_training(model, optimizer, tmp_path, step) == []


class LanguageModel(nn.Module):
    def __init__(self, vocab: int = 20, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def test_lstm_language_model_with_clipping(tmp_path):
    """Tempts saturation (the LSTM's gates are sigmoids inside) and spike (clipped steps)."""
    torch.manual_seed(0)
    model = LanguageModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    text = torch.arange(200) % 7 + (torch.arange(200) // 7) % 3  # a repeating pattern

    def step(i):
        start = (i * 5) % 150
        tokens = torch.stack([text[start + k : start + k + 21] for k in range(8)])
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        update(optimizer, loss)
        return loss

    findings = watch_training(model, optimizer, tmp_path, step, guards=[gw.guards.ClipNorm(1.0)])
    assert findings == []


def warmup_cosine(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def test_transformer_with_warmup_and_cosine(tmp_path):
    """Tempts exploding and spike: the gradient norm moves a lot while the lr ramps up from ~0."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(8, 32), encoder, nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, warmup=20, total=STEPS)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x = torch.randn(8, 10, 8, generator=generator)
        y = (x[:, :, 0] > 0).long() + (x[:, :, 1] > 1).long()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        update(optimizer, loss)
        schedule.step()
        return loss

    assert watch_training(model, optimizer, tmp_path, step) == []


def mlp(width: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, 4),
    )  # fmt: skip


def test_bf16_autocast(tmp_path):
    """Tempts nonfinite, vanishing and underflow (histograms every probe step): bf16 rounds
    small values."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    assert watch_training(model, optimizer, tmp_path, step, histogram_every=1) == []


def test_fp16_with_gradscaler_and_its_skipped_steps(tmp_path):
    """Tempts nonfinite: GradScaler starts at a loss scale that overflows fp16, finds inf
    gradients and skips those steps itself (the optimizer's step() is not called); and
    underflow (fp16, histograms every probe step)."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    generator = torch.Generator().manual_seed(1)
    skipped = 0

    def step(i):
        nonlocal skipped
        x, y = learnable_batch(32, 16, 4, generator)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale
        return loss

    findings = watch_training(model, optimizer, tmp_path, step, histogram_every=1)
    assert skipped > 0  # the temptation happened
    assert findings == []


def test_gradient_accumulation(tmp_path):
    """Tempts spike and exploding: four micro-batches per update."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(4):
            x, y = learnable_batch(8, 16, 4, generator)
            loss = nn.functional.cross_entropy(model(x), y) / 4
            loss.backward()
            total += loss.detach()
        optimizer.step()
        return total

    assert watch_training(model, optimizer, tmp_path, step) == []


def test_frozen_backbone_with_a_trained_head(tmp_path):
    """Tempts vanishing (no gradient in the backbone) and dead_units (a random frozen ReLU)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model[1].parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    assert watch_training(model, optimizer, tmp_path, step) == []


class Recommender(nn.Module):
    def __init__(self, items: int = 500, width: int = 16) -> None:
        super().__init__()
        self.items = nn.EmbeddingBag(items, width, mode="mean")
        self.tower = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        return self.tower(self.items(bags)).squeeze(1)


def test_embedding_bag_recommender(tmp_path):
    """Tempts vanishing: each embedding row gets gradient only when its item appears."""
    torch.manual_seed(0)
    model = Recommender()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    taste = torch.randn(500, generator=torch.Generator().manual_seed(3))

    def step(i):
        bags = torch.randint(0, 500, (64, 6), generator=generator)
        clicked = (taste[bags].mean(dim=1) > 0).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(bags), clicked)
        update(optimizer, loss)
        return loss

    assert watch_training(model, optimizer, tmp_path, step) == []


@pytest.mark.parametrize("per_example", [False, True])
def test_confident_softmax_classifier_trained_to_convergence(tmp_path, per_example):
    """Tempts vanishing: a converged model's gradients shrink towards 0 everywhere; with
    per_example, outlier_examples (few examples keep a gradient) and batch_size."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    x, y = learnable_batch(64, 16, 4, generator)

    def step(i):
        loss = nn.functional.cross_entropy(model(x), y)  # the same batch: it converges
        update(optimizer, loss)
        return loss

    findings = watch_training(model, optimizer, tmp_path, step, steps=200, per_example=per_example)
    assert findings == []


@pytest.mark.parametrize("per_example", [False, True])
def test_adam_on_a_real_small_dataset(tmp_path, per_example):
    """scikit-learn's digits, an MLP with Adam: the plainest healthy run (with per_example:
    tempts outlier_examples and batch_size)."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    step = sampled_step(model, optimizer, x, y, generator)

    findings = watch_training(model, optimizer, tmp_path, step, steps=150, per_example=per_example)
    assert findings == []


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hugging_face_models_with_adamw_and_warmup(tmp_path, family):
    """Tempts saturation/dead units (GELU/SiLU MLPs, softmax attention) and spike (warm-up);
    BERT trains on padded batches."""
    from test_gradcheck import hugging_face_model

    model = hugging_face_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, warmup=10, total=60)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        ids = torch.randint(3, 100, (4, 12), generator=generator)
        ids[0, 8:] = 0  # padding
        mask = (ids != 0).long()
        labels = ids.masked_fill(ids == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
        return out.loss

    assert watch_training(model, optimizer, tmp_path, step, steps=60) == []


def test_warm_restarts_and_a_new_data_phase(tmp_path):
    """Tempts spike: SGDR restarts jump the lr back up, and at step 60 the data changes for good
    (a harder phase with larger inputs): the gradient norm moves to a new level and stays there,
    which is a change of regime, not a transient spike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=20)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(32, 16, 4, generator)
        if i >= 60:
            x = x * 8 + 2  # the new phase
        loss = nn.functional.cross_entropy(model(x), y)
        update(optimizer, loss)
        schedule.step()
        return loss

    findings = watch_training(model, optimizer, tmp_path, step, steps=140)
    run = gw.open_run(tmp_path / "run")
    norms = run.series("global_grad_norm")
    assert norms[70:].mean() > 2 * norms[40:60].mean()  # the temptation happened
    assert findings == []


def test_sparse_relu_head(tmp_path):
    """Tempts dead_units: a ReLU layer biased to fire rarely (each unit on a few examples of a
    batch), which is sparse, not dead: every unit still fires on some examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[0].bias.fill_(-0.8)  # about 8% of the outputs are positive
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def step(i):
        x, y = learnable_batch(64, 16, 4, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        update(optimizer, loss)
        return loss

    findings = watch_training(model, optimizer, tmp_path, step)
    run = gw.open_run(tmp_path / "run")
    outputs = model[1](model[0](torch.randn(64, 16)))
    assert (outputs > 0).float().mean() < 0.2  # sparse indeed
    assert np.nanmax(run.series("dead_frac")[:, run.modules.index("1")]) < 0.5
    assert findings == []


# ---- healthy recipes that tempt the findings of training-code bugs -------------------------------
def classify(model, optimizer, generator, loss_fn=nn.functional.cross_entropy, batch=32):
    """A step function: a learnable batch, `loss_fn`, a plain update."""

    def step(i):
        x, y = learnable_batch(batch, 16, 4, generator)
        loss = loss_fn(model(x), y)
        update(optimizer, loss)
        return loss

    return step


def test_gan_whose_generator_backward_reaches_the_discriminator(tmp_path):
    """Tempts stale_gradients: the generator's backward adds into the discriminator's .grad
    after the discriminator's step; the discriminator clears it before its own backward."""
    torch.manual_seed(0)
    generator_net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
    critic = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    g_opt = torch.optim.Adam(generator_net.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
    data = torch.Generator().manual_seed(1)
    bce = nn.functional.binary_cross_entropy_with_logits

    def step(i):
        real = torch.randn(32, 8, generator=data) * 0.5 + 1
        fake = generator_net(torch.randn(32, 4, generator=data))
        d_opt.zero_grad()
        d_loss = bce(critic(real), torch.ones(32, 1)) + bce(
            critic(fake.detach()), torch.zeros(32, 1)
        )
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        bce(critic(fake), torch.ones(32, 1)).backward()  # also fills the critic's .grad
        g_opt.step()
        return d_loss

    assert watch_training(critic, d_opt, tmp_path, step) == []


def test_label_smoothing_and_a_sigmoid_output_under_bce(tmp_path):
    """Tempts probabilities_as_logits: smoothed targets, and a sigmoid output trained with
    binary_cross_entropy (which expects probabilities)."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    def smoothed(logits, y):
        return nn.functional.cross_entropy(logits, y, label_smoothing=0.1)

    assert (
        watch_training(
            model, optimizer, tmp_path / "a", classify(model, optimizer, generator, smoothed)
        )
        == []
    )
    torch.manual_seed(0)
    model = nn.Sequential(mlp(), nn.Linear(4, 1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def bce(p, y):
        return nn.functional.binary_cross_entropy(p.squeeze(1), (y % 2).float())

    assert (
        watch_training(model, optimizer, tmp_path / "b", classify(model, optimizer, generator, bce))
        == []
    )


@pytest.mark.parametrize(
    "guard", [gw.guards.ZClip(), gw.guards.AutoClip(), gw.guards.ClipNorm(10.0)], ids=str
)
def test_clips_that_act_on_outliers_only(tmp_path, guard):
    """Tempts clip_always: adaptive clips (ZClip, AutoClip at its 10th percentile clips about a
    tenth of the steps) and a threshold above the usual norm that only catches spikes."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    step = classify(model, optimizer, generator)
    assert watch_training(model, optimizer, tmp_path, step, steps=120, guards=[guard]) == []


def test_warm_up_from_zero_and_cosine_to_zero(tmp_path):
    """Tempts learning_rate: the lr starts at exactly 0 and decays to exactly 0."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total, warmup = 120, 30

    def factor(step):
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup - 10))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(1)
    plain = classify(model, optimizer, generator)

    def step(i):
        loss = plain(i)
        schedule.step()
        return loss

    assert watch_training(model, optimizer, tmp_path, step, steps=total) == []
    assert schedule.get_last_lr()[0] == 0.0  # it did end at 0


def test_one_hot_inputs(tmp_path):
    """Tempts input_scale: one-hot columns, most of them zero, at very different frequencies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    weights = torch.logspace(0, 3, 40)  # some categories 1000x rarer than others

    def step(i):
        category = torch.multinomial(weights, 32, replacement=True, generator=generator)
        loss = nn.functional.cross_entropy(
            model(nn.functional.one_hot(category, 40).float()), category % 4
        )
        update(optimizer, loss)
        return loss

    assert watch_training(model, optimizer, tmp_path, step) == []


@pytest.mark.parametrize("mode", ["batch 32", "eval at batch 2"])
def test_batchnorm_with_a_real_batch_or_in_eval(tmp_path, mode):
    """Tempts batchnorm_small_batch: batch 32, or BatchNorm kept in eval mode (frozen
    statistics, as detection models fine-tune) on batches of 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    if mode.startswith("eval"):
        model[0:2](torch.randn(256, 16))  # running statistics from a real batch
        model[1].eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    step = classify(model, optimizer, generator, batch=32 if mode == "batch 32" else 2)
    assert watch_training(model, optimizer, tmp_path, step) == []


def test_zero_initialised_output_head_and_biases(tmp_path):
    """Tempts symmetric_weights: the head's rows start equal (all 0), as do all the biases;
    the head's rows get different gradients and separate after one step."""
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[-1].weight.zero_()
        for module in model:
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    assert watch_training(model, optimizer, tmp_path, classify(model, optimizer, generator)) == []


def test_lstm_reading_digits_row_by_row(tmp_path):
    """Tempts vanishing through time: the untrained LSTM passes 1e-5 of the gradient back over
    the 28 rows, and training overcomes it within a few dozen steps."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = nn.functional.interpolate(images, size=(28, 28), mode="bilinear")[:, 0]
    y = torch.tensor(digits.target)
    torch.manual_seed(0)

    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(28, 64, batch_first=True)
            self.head = nn.Linear(64, 10)

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(rows)[0][:, -1])

    model = Rows()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)

    step = sampled_step(model, optimizer, x, y, generator)

    findings = watch_training(model, optimizer, tmp_path, step, steps=150)
    ratios = gw.open_run(tmp_path / "run").series("time_first_to_last")[:, 0]
    assert np.nanmax(ratios[:30]) < 1e-3 < np.nanmedian(ratios[60:])  # tempted, then overcome
    with torch.no_grad():
        assert (model(x).argmax(dim=1) == y).float().mean() > 0.8  # it trains
    assert findings == []
