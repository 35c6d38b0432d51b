"""Attention, output-logit and Adam-ε statistics (`stats/attention.py`,
`stats/optimizer_state.py`) and the detectors of transformer instabilities
(`detect/instabilities.py`) on the proxy of `transformer_proxy.py`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformer_proxy as proxy
from torch import nn

import gradwatch as gw
from gradwatch.detect.instabilities import ATTN_LOGIT_LIMIT
from gradwatch.stats import attention as attention_stats
from gradwatch.stats import attention_calls


def reference(scores: torch.Tensor) -> tuple[float, float]:
    """max |s| over unmasked scores and the min over heads of the mean query entropy, from
    [batch, heads, queries, keys] scores with −inf where masked."""
    p = scores.softmax(dim=-1)
    largest = scores[p > 0].abs().max().item()
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [batch, heads, queries]
    return largest, h.mean(dim=(0, 2)).min().item()


def watched_step(model: nn.Module, loss_fn, tmp_path, *inputs, **kwargs) -> gw.Run:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1):
        loss = loss_fn(model(*inputs, **kwargs))
        loss.backward()
        optimizer.step()
    return gw.open_run(tmp_path / "run")


def causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    length = s.shape[-1]
    return s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -torch.inf)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_attention_statistics_equal_the_scores_softmax_sees(attention, tmp_path):
    model = proxy.make_model(attention)
    x = proxy.make_text(200)[: 2 * proxy.LENGTH].view(2, -1)
    expected = []
    hidden = model.tok(x) + model.pos
    with torch.no_grad():
        for block in model.blocks:
            q, k, _ = block.attn.qkv(block.ln_1(hidden)).split(proxy.WIDTH, dim=-1)
            q, k = (t.view(2, -1, proxy.HEADS, 8).transpose(1, 2) for t in (q, k))
            expected.append(reference(causal_scores(q, k)))
            hidden = block(hidden)
    run = watched_step(model, lambda z: z.square().mean(), tmp_path, x)
    assert run.attention_modules == ["blocks.0.attn", "blocks.1.attn"]
    got = np.stack([run.series("attn_max_logit")[0], run.series("attn_entropy")[0]], axis=1)
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5)


@pytest.mark.parametrize("one_example_at_a_time", [False, True])
def test_sdpa_masks_scale_and_grouped_heads_are_followed(
    one_example_at_a_time, tmp_path, monkeypatch
):
    if one_example_at_a_time:  # the scores made in chunks of the batch, the mask sliced alike
        monkeypatch.setattr(attention_calls, "CHUNK", 1)

    class GroupedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 16)
            self.kv = nn.Linear(8, 8)

        def forward(self, x, mask):  # type: ignore[no-untyped-def]
            q = self.q(x).view(2, 5, 4, 4).transpose(1, 2)
            k = self.kv(x).view(2, 5, 2, 4).transpose(1, 2)
            return F.scaled_dot_product_attention(
                q, k, k, attn_mask=mask, scale=0.3, enable_gqa=True
            )

    torch.manual_seed(0)
    model, x = GroupedAttention(), torch.randn(2, 5, 8)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        q = model.q(x).view(2, 5, 4, 4).transpose(1, 2)
        k = model.kv(x).view(2, 5, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~mask, -torch.inf)
    run = watched_step(model, lambda y: y.sum(), tmp_path, x, mask)
    got = (run.series("attn_max_logit")[0, 0], run.series("attn_entropy")[0, 0])
    np.testing.assert_allclose(got, reference(scores), rtol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("one_example_at_a_time", [False, True])
def test_multihead_attention_with_masks_and_bias_k(
    need_weights, one_example_at_a_time, tmp_path, monkeypatch
):
    if one_example_at_a_time:
        monkeypatch.setattr(attention_calls, "CHUNK", 1)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    x = torch.randn(3, 4, 8)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[0, 2:] = True
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    _, weights = mha(
        x, x, x, attn_mask=causal, key_padding_mask=padding, average_attn_weights=False
    )
    with torch.no_grad():
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
        q = F.linear(x, w_q, b_q).view(3, 4, 2, 4).transpose(1, 2)
        k = torch.cat([F.linear(x, w_k, b_k), mha.bias_k.expand(3, 1, 8)], dim=1)
        k = k.view(3, 5, 2, 4).transpose(1, 2)
        blocked = (
            torch.cat([causal, torch.zeros(4, 1, dtype=torch.bool)], dim=1)
            | torch.cat([padding, torch.zeros(3, 1, dtype=torch.bool)], dim=1)[:, None, None]
        )
        scores = (q @ k.transpose(-2, -1) / 2).masked_fill(blocked, -torch.inf)
    torch.testing.assert_close(scores.softmax(-1), weights)  # the reference is torch's own

    model = nn.Sequential()
    model.add_module("mha", mha)

    def forward(inputs):  # type: ignore[no-untyped-def]
        return mha(
            inputs, inputs, inputs, attn_mask=causal, key_padding_mask=padding,
            need_weights=need_weights,
        )[0]  # fmt: skip

    model.forward = forward  # type: ignore[method-assign]
    run = watched_step(model, lambda y: y.sum(), tmp_path, x)
    assert run.attention_modules == ["mha"]
    got = (run.series("attn_max_logit")[0, 0], run.series("attn_entropy")[0, 0])
    np.testing.assert_allclose(got, reference(scores), rtol=1e-5)


def test_hugging_face_gpt2_eager_and_sdpa_agree(tmp_path):
    x = proxy.make_text(200)[: 2 * proxy.LENGTH].view(2, -1)
    values = {}
    for attention in ("gpt2-eager", "gpt2-sdpa"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = proxy.make_model(attention)
        run = watched_step(model, lambda out: out.loss, tmp_path / attention, x, labels=x)
        assert run.attention_modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
        values[attention] = np.stack(
            [run.series(n)[0] for n in ("attn_max_logit", "attn_entropy")]
            + [np.repeat(run.series("logit_lse")[0], 2)]
        )
    np.testing.assert_allclose(values["gpt2-eager"], values["gpt2-sdpa"], rtol=1e-4)
    assert np.isfinite(values["gpt2-eager"]).all()


def test_logit_lse_is_the_cross_entropy_inputs_log_z(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    x, y = torch.randn(5, 3, 4), torch.randint(0, 6, (5, 3))
    y[0, 0] = -100  # ignored: not a position of the loss
    with torch.no_grad():
        lse = torch.logsumexp(model(x), dim=-1)[y != -100]

    def loss_fn(z):  # type: ignore[no-untyped-def]
        return nn.CrossEntropyLoss()(z.transpose(1, 2), y)  # class axis 1, as torch wants

    run = watched_step(model, loss_fn, tmp_path, x)
    np.testing.assert_allclose(run.series("logit_lse")[0], lse.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(run.series("logit_lse_max")[0], lse.abs().max().item(), rtol=1e-5)


def test_a_softmax_in_the_loss_code_is_not_attention(tmp_path):
    model = nn.Linear(4, 6)
    x = torch.randn(2, 3, 6, 4)  # the output is [2, 3, 6, 6]: shaped like attention scores

    def loss_fn(z):  # type: ignore[no-untyped-def]
        return -(z.softmax(dim=-1) * z).sum()

    run = watched_step(model, loss_fn, tmp_path, x)
    assert run.attention_modules == []


def test_a_regression_loss_records_no_logits(tmp_path):
    model = nn.Linear(4, 300)
    run = watched_step(model, lambda z: (z - 100).square().mean(), tmp_path, torch.randn(8, 4))
    assert np.isnan(run.series("logit_lse")).all()
    assert run.attention_modules == []


def test_adam_eps_frac_counts_entries_where_eps_dominates(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3, betas=(0.9, 0.99))
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1):
        for _ in range(3):
            x = torch.randn(16, 4) * torch.tensor([1e-4, 1e-2, 1.0, 1e-6])
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    expected = []
    for p in model.parameters():
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.99 ** state["step"].item())
        expected.append((v_hat.sqrt() < 10 * 1e-3).float().mean().item())
    got = gw.open_run(tmp_path / "run").series("adam_eps_frac")[-1]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert any(0 < e < 1 for e in expected)  # the case is not degenerate


def test_sgd_has_no_adam_eps_frac(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", probe_every=1):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    assert np.isnan(gw.open_run(tmp_path / "run").series("adam_eps_frac")).all()


# ---- the detectors on the proxy ------------------------------------------------------------
def kinds(result: proxy.Result) -> dict[str, gw.Finding]:
    """The earliest finding of each kind (findings are listed by step)."""
    first: dict[str, gw.Finding] = {}
    for f in result.findings:
        first.setdefault(f.kind, f)
    return first


# Max attention logit and lowest head entropy every 10 steps, measured (2 threads): a runaway
# (the copy proxy, seed 0, blocks.0.attn; its loss separates from the qk-layernorm twin's at
# step 71) and growth that levels off (the markov proxy at lr 0.1, seed 2, blocks.1.attn,
# whose loss ends below its twin's).
RUNAWAY = (
    [1, 3, 6, 17, 25, 74, 161, 218, 259, 300],
    [2.5, 2.4, 2.0, 1.5, 0.81, 0.33, 0.22, 0.12, 0.07, 0.09],
)
LEVELS_OFF = (
    [2, 9, 51, 97, 154, 147, 194, 231, 224, 252],
    [2.5, 1.6, 0.63, 0.47, 0.33, 0.25, 0.13, 0.07, 0.07, 0.03],
)


def logit_findings(trace, every: int = 10, flush_every: int = 3) -> list[gw.Finding]:
    """`attention_logit_growth` over `trace` (values every 10 steps), probed every `every` steps
    (geometric interpolation between the measured points) and flushed in blocks of
    `flush_every` probe steps, one detector memory for the run."""
    from types import SimpleNamespace

    from gradwatch.detect.instabilities import attention_logit_growth
    from gradwatch.stats.buffer import ProbeArray

    steps = np.arange(0, 10 * (len(trace[0]) - 1) + 1, every)
    values = [np.exp(np.interp(steps, np.arange(len(t)) * 10, np.log(t))) for t in trace]
    data = np.stack(values, -1)[:, None, :].astype(np.float32)  # [steps, 1 module, 2 stats]
    memory: dict = {}
    found = []
    for start in range(0, len(steps), flush_every):
        rows = slice(start, start + flush_every)
        array = ProbeArray(steps[rows], ("blocks.0.attn",), data[rows])
        block = SimpleNamespace(arrays={attention_stats.ATTENTION: array})
        found += attention_logit_growth(block, None, memory)
    return found


@pytest.mark.parametrize("every", [10, 5, 2])
def test_logit_trend_names_a_runaway_before_the_level_is_reached(every):
    found = logit_findings(RUNAWAY, every)
    assert found, "the runaway was not named"
    first = found[0]
    assert first.step == 60 and first.evidence["rule"] == "trend"  # 25 -> 74 -> 161, entropy 0.22
    assert first.evidence["max_logit"] < 500  # the level rule alone would still be silent
    assert "qk-layernorm" in first.remedy


@pytest.mark.parametrize("every", [10, 5, 2])
def test_logit_trend_is_silent_on_growth_that_levels_off(every):
    assert logit_findings(LEVELS_OFF, every) == []


def test_the_level_rule_still_names_a_collapse_the_trend_missed():
    slow = ([100, 160, 250, 400, 520, 600, 650], [0.3, 0.2, 0.15, 0.12, 0.08, 0.05, 0.04])
    found = logit_findings(slow)
    assert [(f.step, f.evidence["rule"]) for f in found][:1] == [(40, "level")]


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_attention_logit_growth_is_named_well_before_the_loss_separates(attention):
    """The markov proxy in full, over proxy.SEEDS against each seed's qk-layernorm twin; the
    separation is that of the seed-averaged loss ratio (5% margin). Measured on 2 threads
    (docs/early-warning.md): separation at step 107 (explicit) and 106 (SDPA), the mean named
    step 50 and 49 steps before it. The training is chaotic, so the numbers move with the thread
    count and the machine: on another 2-core machine of the same kind the explicit run named
    steps 60, 80, 40 against a separation at 96 (lead 36). The bar is 30, a regression guard
    below every lead measured, not the issue's 50 (issue 25 is blocked on that bar)."""
    lead = proxy.early_warning("markov", attention, 0.2)
    assert lead.separation is not None and lead.lead >= 30, (lead.named, lead.separation)
    assert np.mean(lead.known) < lead.separation, (lead.known, lead.separation)
    assert all(proxy.KIND not in kinds(r) for r in lead.twins)
    for finding in (kinds(r)[proxy.KIND] for r in lead.runs):
        assert finding.layer.startswith("blocks.") and finding.layer.endswith(".attn")
        assert "qk-layernorm" in finding.remedy


# The proxies the first rule was not calibrated on, each reduced for CI to seed 0 with both runs
# stopped at the separation of the mean loss ratio over proxy.SEEDS that the full table measured
# (`python tests/transformer_proxy.py`, 2 threads): the finding must be named `bar` steps before
# it, from the trend (the level rule alone named all three after the separation), and the
# qk-layernorm twin must stay silent that far. Seed 0 named steps 60, 40 and 40 in that run; the
# bars leave a probe step of room. They are not the 50 steps: 50 steps before these
# separations the max logit was 1-20 with head entropy ≥ 0.8, inside what the healthy runs show.
OTHER_PROXIES = [
    ("copy", "explicit", 0.05, 78, 10),
    ("reverse", "explicit", 0.1, 74, 20),
    ("sort", "explicit", 0.1, 50, 0),
]


@pytest.mark.parametrize(("name", "attention", "lr", "separates", "bar"), OTHER_PROXIES)
def test_attention_logit_growth_on_proxies_it_was_not_tuned_on(name, attention, lr, separates, bar):
    lead = proxy.early_warning(name, attention, lr, seeds=(0,), stop=separates)
    finding = kinds(lead.runs[0])[proxy.KIND]
    assert finding.step <= separates - bar, (finding.step, separates)
    largest, _ = proxy.attention_at(lead.runs[0], finding.step)
    assert largest < ATTN_LOGIT_LIMIT  # named by the trend: the level was not reached yet
    assert finding.layer.startswith("blocks.") and finding.layer.endswith(".attn")
    assert kinds(lead.twins[0]) == {}


@pytest.mark.parametrize("attention", ["explicit", "mha", "gpt2-eager"])
def test_no_attention_finding_at_a_low_learning_rate(attention):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert kinds(proxy.train(attention, lr=0.01, steps=120)) == {}


@pytest.mark.parametrize(("attention", "lr"), [("explicit", 0.1), ("gpt2-sdpa", 0.08)])
def test_no_attention_finding_where_sharp_heads_train_well(attention, lr):
    """The tempting case: no qk-layernorm, logits up to ~300 and sharp heads, but the loss ends
    below the qk-layernorm run's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = proxy.train(attention, lr=lr)
        stable = proxy.train(attention, qk_norm=True, lr=lr)
    assert proxy.smoothed(plain.losses)[-1] < proxy.smoothed(stable.losses)[-1]
    assert "attention_logit_growth" not in kinds(plain)


def test_no_attention_finding_for_gpt2_with_qk_layernorm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stable = proxy.train("gpt2-sdpa", qk_norm=True, lr=proxy.UNSTABLE_LR["gpt2-sdpa"])
    assert kinds(stable) == {}


@pytest.mark.parametrize("attention", ["mha", "gpt2-eager"])
def test_attention_logit_growth_with_torch_and_hugging_face_attention(attention):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unstable = proxy.train(attention, lr=proxy.UNSTABLE_LR[attention])
    finding = kinds(unstable)["attention_logit_growth"]
    expected = "blocks.{}.attn.attn" if attention == "mha" else "transformer.h.{}.attn"
    assert finding.layer in {expected.format(i) for i in range(proxy.LAYERS)}
    assert finding.step <= 60


def test_logit_divergence_under_a_drifting_bias_and_not_with_z_loss():
    drifting = proxy.train("explicit", qk_norm=True, lr=0.3, bias_drift=0.2, steps=160)
    finding = kinds(drifting)["logit_divergence"]
    assert finding.evidence["logit_lse"] <= -20
    assert "z-loss" in finding.remedy
    held = proxy.train("explicit", qk_norm=True, lr=0.3, bias_drift=0.2, z_loss=1e-2, steps=160)
    lse = gw.open_run(held.run_dir).series("logit_lse")
    assert np.nanmax(np.abs(lse)) < 10  # measured: the z-loss holds it, the rule is not blind
    assert "logit_divergence" not in kinds(held)


def test_adam_epsilon_when_eps_dominates_and_not_by_default():
    raised = proxy.train("explicit", qk_norm=True, lr=0.01, eps=1.0, steps=40)
    finding = kinds(raised)["adam_epsilon"]
    assert "blocks.0.attn.qkv.weight" in finding.evidence["tensors"]
    assert "tok.weight" not in finding.evidence["tensors"]  # embeddings are left out
    default = proxy.train("explicit", qk_norm=True, lr=0.01, steps=40)
    shares = gw.open_run(default.run_dir).series("adam_eps_frac")
    assert (
        np.nanmax(
            shares[
                :,
                [
                    i
                    for i, n in enumerate(gw.open_run(default.run_dir).tensors)
                    if n.endswith("qkv.weight")
                ],
            ]
        )
        < 0.5
    )
    assert "adam_epsilon" not in kinds(default)


# ---- where the statistics go ---------------------------------------------------------------
def test_tensorboard_and_live_sinks_carry_the_attention_statistics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradwatch.sinks.live import LiveMetrics
    from gradwatch.sinks.tensorboard import export_tensorboard

    result = proxy.train("explicit", lr=0.01, steps=20, run_dir=str(tmp_path / "run"))
    run = gw.open_run(result.run_dir)
    export_tensorboard(result.run_dir, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    written = events.Scalars("attention/attn_max_logit/blocks.1.attn")
    assert [e.step for e in written] == [0, 10]
    np.testing.assert_allclose(
        [e.value for e in written], run.series("attn_max_logit")[[0, 10], 1], rtol=1e-6
    )
    assert "scalars/logit_lse" in events.Tags()["scalars"]
    rows = dict(row for block in run.blocks() for row in LiveMetrics().rows(block, [], []))
    assert rows[10]["gradwatch/attn_entropy/blocks.0.attn"] == pytest.approx(
        float(run.series("attn_entropy")[10, 0])
    )
    assert "gradwatch/logit_lse" in rows[10] and "gradwatch/logit_lse" not in rows[11]
