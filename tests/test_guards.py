"""Guards: parity with references, behaviour on spikes and NaNs, AMP, state round trips."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import small_mlp, train_step
from torch import nn

import gradwatch as gw
from gradwatch.guards import AGC, AutoClip, ClipNorm, ClipValue, Rollback, SkipNonFinite, ZClip


def backward(model: nn.Module, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g) * scale
    y = torch.randint(0, 3, (32,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def grads_after_guard(model: nn.Module, guard, tmp_path) -> list[torch.Tensor]:
    """Run one step with lr 0 under `guard` and return the gradients the optimizer saw."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", guards=[guard]):
        backward(model, seed=3)
        optimizer.step()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_norm_equals_clip_grad_norm(tmp_path, norm_type, max_norm):
    model = small_mlp()
    reference = copy.deepcopy(model)
    clipped = grads_after_guard(model, ClipNorm(max_norm, norm_type), tmp_path)
    backward(reference, seed=3)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
    for ours, theirs in zip(clipped, [p.grad for p in reference.parameters()], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.series("ClipNorm.norm"), [total.item()], rtol=1e-6)
    assert [e.kind for e in run.events] == (["clip"] if total > max_norm else [])


def test_global_grad_norm_is_recorded_before_the_guards(tmp_path):
    model = small_mlp()
    reference = copy.deepcopy(model)
    grads_after_guard(model, ClipNorm(0.01), tmp_path)
    backward(reference, seed=3)
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in reference.parameters()])
    )
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.series("global_grad_norm"), [expected.item()], rtol=1e-6)
    assert run.series("global_grad_norm")[0] > 0.01


def agc_reference(weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float):
    """The paper's rule, unit by unit, with loops: G_i *= λ max(‖W_i‖, eps) / ‖G_i‖ when above."""
    grad = grad.clone()
    units = range(weight.shape[0]) if weight.dim() > 1 else [None]
    for i in units:
        w = weight[i] if i is not None else weight
        g = grad[i] if i is not None else grad
        limit = clipping * max(w.norm().item(), eps)
        if g.norm().item() > limit:
            g.mul_(limit / g.norm().item())
    return grad


def test_agc_equals_the_papers_formula(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(8, 3, 6, 6) * 5, torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    nn.functional.cross_entropy(reference(x), y).backward()
    with gw.watch(
        model,
        optimizer,
        run_dir=tmp_path / "run",
        guards=[AGC(clipping=0.02, eps=1e-3, exclude=["5"])],
    ):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        expected = (
            q.grad if name.startswith("5.") else agc_reference(q.detach(), q.grad, 0.02, 1e-3)
        )
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8, msg=name)
    assert any(
        not torch.equal(p.grad, q.grad)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert gw.open_run(tmp_path / "run").events[0].detail["clipped_units"] > 0


def train_with_spike(tmp_path, guards, spike_step=40, steps=60, factor=100.0):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", guards=guards, flush_every=16):
        for step in range(steps):
            backward(model, seed=step)
            if step == spike_step:
                for p in model.parameters():
                    p.grad.mul_(factor)
            optimizer.step()
            optimizer.zero_grad()
    return model, gw.open_run(tmp_path / "run")


def test_zclip_clips_a_spike_after_warmup_and_leaves_normal_steps_alone(tmp_path):
    _, run = train_with_spike(tmp_path, [ZClip()])
    clips = {e.step: e for e in run.events if e.kind == "clip"}
    norms = run.series("global_grad_norm")
    typical = np.median(norms[25:40])
    assert clips[40].detail["norm"] == pytest.approx(norms[40], rel=1e-5)
    assert clips[40].detail["clipped_to"] < 3 * typical  # a 100x spike cut back near the level
    # ordinary steps: the paper's z > 2.5 test trims a rare natural outlier, and only a little
    others = [e for step, e in clips.items() if step != 40]
    assert len(others) <= 3
    assert all(e.detail["scale"] > 0.5 for e in others)
    assert np.isnan(run.series("ZClip.scale")[:25]).all()  # warm-up: no decision


def test_autoclip_threshold_is_the_percentile_of_the_history(tmp_path):
    _, run = train_with_spike(tmp_path, [AutoClip(percentile=25)], steps=30)
    norms = run.series("global_grad_norm")
    thresholds = run.series("AutoClip.threshold")
    for t in range(len(norms)):
        assert thresholds[t] == pytest.approx(np.percentile(norms[: t + 1], 25), rel=1e-5)
    windowed_dir = tmp_path / "window"
    windowed_dir.mkdir()
    _, run = train_with_spike(windowed_dir, [AutoClip(percentile=50, history=5)], steps=20)
    norms, thresholds = run.series("global_grad_norm"), run.series("AutoClip.threshold")
    assert thresholds[12] == pytest.approx(np.percentile(norms[8:13], 50), rel=1e-5)


def test_clip_value_clamps_every_entry(tmp_path):
    model = small_mlp()
    clipped = grads_after_guard(model, ClipValue(1e-3), tmp_path)
    assert max(g.abs().max().item() for g in clipped) <= torch.tensor(1e-3).item()
    assert [e.kind for e in gw.open_run(tmp_path / "run").events] == ["clip"]


def test_skip_nonfinite_leaves_parameters_and_optimizer_state_untouched(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", guards=[SkipNonFinite()]) as w:
        for step in range(3):
            backward(model, seed=step)
            optimizer.step()
            optimizer.zero_grad()
        params = copy.deepcopy(model.state_dict())
        state = copy.deepcopy(optimizer.state_dict())
        backward(model, seed=9)
        model[2].weight.grad[0, 0] = torch.nan
        optimizer.step()
        assert w.step_count == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    after = optimizer.state_dict()["state"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), (index, key)
    events = gw.open_run(tmp_path / "run").events
    assert [(e.kind, e.step) for e in events] == [("skip", 3)]


def teacher_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(6, 3)
    with torch.no_grad():
        x = torch.randn(600, 6, generator=g)
        y = teacher(x).argmax(1)
        # 20% of the labels are noise: the loss settles on a plateau well above 0, so "within
        # 10% of the clean run" compares converged models rather than the tail of a decay
        noisy = torch.rand(600, generator=g) < 0.2
        y[noisy] = torch.randint(0, 3, (int(noisy.sum()),), generator=g)
    return x[:500], y[:500], x[500:], y[500:]


def train_with_faults(tmp_path, guards, faults: dict[int, str], steps=150):
    """Train a small MLP with injected faults; return (held-out loss, all parameters finite)."""
    torch.manual_seed(0)
    x, y, x_test, y_test = teacher_data()
    model = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gw.watch(model, optimizer, run_dir=tmp_path, guards=guards) as w:
        for step in range(steps):
            index = torch.randint(0, 500, (32,), generator=torch.Generator().manual_seed(step))
            inputs = x[index] * (1e4 if faults.get(step) == "corrupt_batch" else 1.0)
            loss = nn.functional.cross_entropy(model(inputs), y[index])
            optimizer.zero_grad()
            loss.backward()
            for p in model.parameters():
                if faults.get(step) == "nan":
                    p.grad[..., 0] = torch.nan
                elif faults.get(step) == "spike":
                    p.grad.mul_(1e6)
            optimizer.step()
            w.log(loss=loss)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        held_out = nn.functional.cross_entropy(model(x_test), y_test).item()
    return held_out, finite


GRAD_FAULTS = {30: "nan", 45: "spike", 60: "nan", 90: "spike"}


def test_skip_and_zclip_survive_nan_and_spiked_gradients(tmp_path):
    clean, _ = train_with_faults(tmp_path / "clean", [], {})
    guarded, finite = train_with_faults(
        tmp_path / "guarded", [SkipNonFinite(), ZClip()], GRAD_FAULTS
    )
    assert finite
    assert abs(guarded - clean) <= 0.1 * clean
    _, unguarded_finite = train_with_faults(tmp_path / "bare", [], GRAD_FAULTS)
    assert not unguarded_finite  # the same injections poison the weights without guards
    events = gw.open_run(tmp_path / "guarded").events
    assert {(e.kind, e.step) for e in events} >= {
        ("skip", 30),
        ("skip", 60),
        ("clip", 45),
        ("clip", 90),
    }


def test_rollback_recovers_from_a_corrupted_batch(tmp_path):
    faults = {70: "corrupt_batch"}
    clean, _ = train_with_faults(tmp_path / "clean", [], {})
    guards = [SkipNonFinite(), ZClip(), Rollback(every=20)]
    guarded, finite = train_with_faults(tmp_path / "guarded", guards, faults)
    assert finite
    assert abs(guarded - clean) <= 0.1 * clean
    bare, bare_finite = train_with_faults(tmp_path / "bare", [], faults)
    assert not bare_finite or bare > 1.3 * clean  # unguarded, the corrupted batch wrecks the model
    rollbacks = [e for e in gw.open_run(tmp_path / "guarded").events if e.kind == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0].detail["restored_step"] <= 70


def test_rollback_gives_up_with_a_clear_error(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(
            gw.guards.StopTraining, match=r"Rollback gave up at step \d+ after 2 rollbacks"
        ),
        gw.watch(model, optimizer, run_dir=tmp_path / "r", guards=[Rollback(max_rollbacks=2)]),
    ):
        for step in range(10):
            backward(model, seed=step)
            model[0].weight.grad[0, 0] = torch.nan
            optimizer.step()


def test_guards_see_unscaled_gradients_under_grad_scaler(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    seen = []
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", guards=[ClipNorm(0.05)]):
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(
                    model(torch.randn(16, 6)), torch.randint(0, 3, (16,))
                )
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            seen.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            scaler.step(optimizer)  # the guards run inside, after unscaling
            scaler.update()
            after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            assert after.item() == pytest.approx(min(0.05, seen[-1].item()), rel=1e-4)
            optimizer.zero_grad()
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.series("global_grad_norm"), [s.item() for s in seen], rtol=1e-5)


def run_zclip_autoclip(tmp_path, steps, state=None, start=0):
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    with gw.watch(
        model, optimizer, run_dir=tmp_path, guards=[ZClip(warmup=10), AutoClip(percentile=50)]
    ) as w:
        if state is not None:
            w.load_state_dict(state["watcher"])
        for step in range(start, start + steps):
            backward(model, seed=step, scale=30.0 if step % 17 == 0 else 1.0)
            optimizer.step()
            optimizer.zero_grad()
    return model, {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "watcher": copy.deepcopy(w.state_dict()),
    }


def test_guard_state_round_trips_mid_run(tmp_path):
    whole, _ = run_zclip_autoclip(tmp_path / "whole", 60)
    _, state = run_zclip_autoclip(tmp_path / "first", 30)
    resumed, _ = run_zclip_autoclip(tmp_path / "second", 30, state=state, start=30)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    second = gw.open_run(tmp_path / "second")
    assert second.steps[0] == 30  # the step counter resumed too


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ClipNorm(-1.0), ValueError, "max_norm must be a positive finite number, got -1"),
        (lambda: ClipNorm(1.0, norm_type=0), ValueError, "norm_type must be > 0 or inf"),
        (lambda: AutoClip(percentile=0), ValueError, r"percentile must be in \(0, 100\]"),
        (lambda: ZClip(alpha=1.5), ValueError, r"alpha must be in \(0, 1\)"),
        (lambda: Rollback(every=0), ValueError, "every must be an int >= 1, got 0"),
        (lambda: Rollback(lr_factor=2.0), ValueError, r"lr_factor must be in \(0, 1\]"),
    ],
)
def test_bad_guard_settings_fail_with_the_name_and_value(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_guards_need_an_optimizer_and_must_be_guards(tmp_path):
    with pytest.raises(ValueError, match=r"guards act inside optimizer\.step"):
        gw.watch(small_mlp(), run_dir=tmp_path / "a", guards=[ZClip()])
    model = small_mlp()
    with pytest.raises(TypeError, match="guards must be gradwatch guards"):
        gw.watch(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            run_dir=tmp_path / "b",
            guards=["clip"],
        )


def test_an_object_with_only_apply_is_refused_at_watch_naming_what_it_lacks(tmp_path):
    """The watcher also calls events(), state_dict() and reads runs_on_skipped_steps: an
    object with apply() alone used to pass and fail mid-training."""

    class HalfAGuard:
        def apply(self, ctx):
            pass

    class Scaler(gw.guards.Guard):  # the documented way: subclass Guard, write apply
        def apply(self, ctx):
            pass

    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    message = r"events\(\), state_dict\(\), load_state_dict\(\), runs_on_skipped_steps"
    with pytest.raises(TypeError, match=message):
        gw.watch(model, optimizer, run_dir=tmp_path / "a", guards=[HalfAGuard()])
    with gw.watch(model, optimizer, run_dir=tmp_path / "b", guards=[Scaler()]) as w:
        train_step(model, optimizer)
    assert w.step_count == 1


def test_repeated_guard_classes_get_distinct_labels(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    first, second = ClipNorm(10.0), ClipNorm(0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "run", guards=[first, second]):
        backward(model, seed=0)
        optimizer.step()
    assert (first.label, second.label) == ("ClipNorm", "ClipNorm_2")
    assert [e.guard for e in gw.open_run(tmp_path / "run").events] == ["ClipNorm_2"]


def test_zclip_loaded_state_is_copied_not_written_into(tmp_path):
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = ZClip(warmup=10)
    with gw.watch(model, optimizer, run_dir=tmp_path / "a", guards=[first]):
        for _ in range(4):  # mid warm-up: 4 of 10 norms collected
            train_step(model, optimizer)
    state = first.state_dict()
    saved = state["warmup_norms"].clone()
    second = ZClip(warmup=10)
    second.load_state_dict(state)
    with gw.watch(model, optimizer, run_dir=tmp_path / "b", guards=[second]):
        for _ in range(8):  # finishes the warm-up, writing 6 more norms
            train_step(model, optimizer)
    torch.testing.assert_close(state["warmup_norms"], saved, rtol=0, atol=0, equal_nan=True)
    assert second.state_dict()["seen"] == 10
