"""watch(): the step schedule, logging, bad input, no host sync, and leaving no trace."""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import small_mlp, train_step
from sync_sentinel import SyncSentinel
from torch import nn

import gradwatch as gw
from gradwatch.stats import flow, grads, stale


def hook_count(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    module_hooks = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )
    tensor_hooks = sum(len(p._backward_hooks or {}) for p in model.parameters())
    optim_hooks = len(optimizer._optimizer_step_pre_hooks) + len(
        optimizer._optimizer_step_post_hooks
    )
    return module_hooks + tensor_hooks + optim_hooks


def test_every_and_probe_every_set_which_steps_are_recorded(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "r", every=3, probe_every=4, flush_every=2
    ) as w:
        for _ in range(10):
            train_step(model, optimizer)
        assert w.step_count == 10
    run = gw.open_run(tmp_path / "r")
    np.testing.assert_array_equal(run.steps, [0, 3, 4, 6, 8, 9])
    probed = ~np.isnan(run.series("update_ratio")).all(axis=1)
    np.testing.assert_array_equal(run.steps[probed], [0, 4, 8])


def test_probe_every_none_records_no_probe_statistics(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=None):
        for _ in range(3):
            train_step(model, optimizer)
    run = gw.open_run(tmp_path / "r")
    assert np.isnan(run.series("param_norm")).all()
    assert np.isfinite(run.series("grad_norm")).all()


def test_log_attaches_scalars_to_the_step_just_taken(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", flush_every=3) as w:
        for step in range(7):
            losses.append(train_step(model, optimizer).item())
            w.log(loss=torch.tensor(losses[-1]), lr=0.01 * step)
    run = gw.open_run(tmp_path / "r")
    np.testing.assert_allclose(run.series("loss"), losses, rtol=1e-6)
    np.testing.assert_allclose(run.series("lr"), 0.01 * np.arange(7), rtol=1e-6)
    with pytest.raises(KeyError, match="accuracy"):
        run.series("accuracy")


def test_watch_without_optimizer_counts_calls_to_step(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = [model[0].weight.detach().clone()]
    with gw.watch(model, run_dir=tmp_path / "r", probe_every=1) as w:
        for _ in range(3):
            w.log(loss=1.5)
            train_step(model, optimizer)
            w.step()
            weights.append(model[0].weight.detach().clone())
        with pytest.raises(RuntimeError, match="already watched"):
            gw.watch(model, run_dir=tmp_path / "r2")
    run = gw.open_run(tmp_path / "r")
    np.testing.assert_array_equal(run.steps, [0, 1, 2])
    np.testing.assert_array_equal(run.series("loss"), [1.5, 1.5, 1.5])
    column = run.tensors.index("0.weight")
    expected = [
        (torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)).item()
        for before, after in itertools.pairwise(weights)
    ]
    np.testing.assert_allclose(run.series("update_ratio")[:, column], expected, rtol=1e-5)


def test_step_with_an_optimizer_is_refused(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        gw.watch(model, optimizer, run_dir=tmp_path / "r") as w,
        pytest.raises(RuntimeError, match=r"optimizer\.step"),
    ):
        w.step()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "nn.Module as model, got str"),
        ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"optimizer": "foreign"}, ValueError, "holds none of the model's parameters"),
        ({"flush_every": 0}, ValueError, "flush_every must be an int >= 1, got 0"),
        ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"probe_every": -2}, ValueError, "probe_every must be an int >= 1"),
    ],
)
def test_bad_input_fails_at_watch_with_a_message_that_names_it(tmp_path, kwargs, error, match):
    model = small_mlp()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    if kwargs.get("optimizer") == "foreign":
        kwargs = {"optimizer": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gw.watch(args.pop("model"), args.pop("optimizer"), run_dir=tmp_path / "r", **args)
    assert not (tmp_path / "r").exists() or not kwargs.get("model")


def test_unwritable_run_dir_fails_at_watch(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=f"run_dir .* {str(blocker)!r} is a file"):
        gw.watch(small_mlp(), run_dir=blocker / "run")


def test_existing_run_is_never_overwritten(tmp_path):
    model = small_mlp()
    gw.watch(model, run_dir=tmp_path / "r").close()
    with pytest.raises(FileExistsError, match="already holds a gradwatch run"):
        gw.watch(model, run_dir=tmp_path / "r")


def test_optimizer_missing_some_parameters_warns_by_name(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"4 trainable parameters .*2\.weight"):
        gw.watch(model, optimizer, run_dir=tmp_path / "r").close()


def test_model_without_trainable_parameters_is_refused(tmp_path):
    model = small_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gw.watch(model, run_dir=tmp_path / "r")


def test_training_bug_probes_make_no_host_sync(tmp_path):
    """The probes behind the training-code findings: gradients carried over (no zero_grad: the
    stale hook reads a present .grad), BatchNorm's values per channel, the input's scale, and a
    sigmoid output into binary_cross_entropy_with_logits."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,)).float()
    w = gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=2, flush_every=3)
    with SyncSentinel() as sentinel, w:
        for _ in range(7):
            out = torch.sigmoid(model(x)).squeeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(out, y)
            loss.backward()  # never zeroed: every probe step finds an earlier gradient in .grad
            optimizer.step()
    assert not sentinel.sites, sentinel.summary()
    run = gw.open_run(tmp_path / "r")
    assert np.nanmax(run.series("stale_norm")) > 0
    assert np.nanmax(run.series("norm_values")) == 16
    assert np.nanmax(run.series("logit_prob_frac")) == 1.0


def test_close_removes_every_hook_and_leaves_the_model_as_it_was(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks_before = hook_count(model, optimizer)
    state_keys = list(model.state_dict())
    w = gw.watch(model, optimizer, run_dir=tmp_path / "r")
    assert hook_count(model, optimizer) > hooks_before
    train_step(model, optimizer)
    w.close()
    w.close()  # idempotent
    assert hook_count(model, optimizer) == hooks_before
    assert list(model.state_dict()) == state_keys
    pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)
    with gw.watch(model, optimizer, run_dir=tmp_path / "again") as again:
        train_step(model, optimizer)
        assert again.step_count == 1
    assert len(gw.open_run(tmp_path / "again").steps) == 1


def test_closed_watcher_refuses_more_calls(tmp_path):
    model = small_mlp()
    w = gw.watch(model, run_dir=tmp_path / "r")
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.log(loss=1.0)


def test_log_rejects_a_tensor_that_is_not_a_scalar(tmp_path):
    model = small_mlp()
    with gw.watch(model, run_dir=tmp_path / "r") as w, pytest.raises(ValueError, match="shape"):
        w.log(loss=torch.ones(3))


def test_compile_works_after_close(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r"):
        train_step(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 6)
    torch.testing.assert_close(compiled(x), model(x))


def closure_training(tmp_path, make_optimizer, steps=6):
    """Train with optimizer.step(closure); the reference is the gradient norm that the closure's
    first call of each step leaves (LBFGS calls it again in its line search)."""
    model = small_mlp()
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    first_norms: list[float] = []
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=None) as w:
        for _ in range(steps):
            calls = 0

            def closure():
                nonlocal calls
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                calls += 1
                if calls == 1:
                    grads = [p.grad for p in model.parameters()]
                    first_norms.append(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(g) for g in grads])).item())  # fmt: skip
                return loss

            optimizer.step(closure)
    return gw.open_run(tmp_path / "r"), first_norms, w


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1),
        lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=4),
    ],
    ids=["sgd", "lbfgs"],
)
def test_step_with_a_closure_records_this_steps_gradients(tmp_path, make_optimizer):
    run, first_norms, w = closure_training(tmp_path, make_optimizer)
    np.testing.assert_array_equal(run.steps, np.arange(6))
    np.testing.assert_allclose(run.series("global_grad_norm"), first_norms, rtol=1e-6)
    assert w.findings() == []  # no false non-finite finding from a step without gradients


def test_guards_act_on_the_closures_gradients(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with gw.watch(model, optimizer, run_dir=tmp_path / "r", guards=[gw.guards.ClipNorm(1e-3)]):
        optimizer.step(closure)
        clipped = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
        )
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_a_deepspeed_engine_is_refused_clearly(tmp_path):
    class DeepSpeedEngine(nn.Module):  # what deepspeed.initialize returns, by name
        def __init__(self) -> None:
            super().__init__()
            self.module = small_mlp()

    with pytest.raises(ValueError, match="DeepSpeed engines are not supported"):
        gw.watch(DeepSpeedEngine(), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def fail_on_call(n: int, original):
    """`original`, raising a ZeroDivisionError (standing for a bug in gradwatch) on call n."""
    calls = 0

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise ZeroDivisionError("an injected fault in gradwatch")
        return original(*args, **kwargs)

    return failing


def training(model, optimizer, steps, w=None, zero_grad=True):
    """The same data every time (seeded); a step without zero_grad when asked."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = (
            torch.randn(32, 6, generator=generator),
            torch.randint(0, 3, (32,), generator=generator),
        )
        loss = nn.functional.cross_entropy(model(x), y)
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if w is not None:
            w.log(loss=loss)  # a no-op once gradwatch failed, never an error


@pytest.mark.parametrize(
    ("where", "owner", "name", "call"),
    [
        ("forward hook", flow, "activation_moments", 7),
        ("optimizer step hook", grads.GradStatistics, "record_grads", 4),
        ("backward tensor hook", stale, "_norm", 3),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_a_failure_inside_gradwatch_never_reaches_or_changes_the_training(
    tmp_path, monkeypatch, caplog, where, owner, name, call
):
    monkeypatch.setattr(owner, name, fail_on_call(call, getattr(owner, name)))
    zero_grad = where != "backward tensor hook"  # carried-over gradients reach the hook
    torch.manual_seed(0)
    plain = small_mlp()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    training(plain, optimizer, 30, zero_grad=zero_grad)

    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gw.watch(model, optimizer, run_dir=tmp_path / "r", probe_every=2, flush_every=5)
    training(model, optimizer, 30, w, zero_grad=zero_grad)
    w.close()

    for mine, reference in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(mine, reference)  # the training is exactly the unwatched one
    reports = [r for r in caplog.records if "injected fault" in (r.getMessage() or "")]
    assert len(reports) == 1 and "the training goes on unwatched" in reports[0].getMessage()
    run = gw.open_run(tmp_path / "r")
    assert "ZeroDivisionError" in run.meta["failed"] and run.closed
    assert 0 < len(run.steps) < 30  # what was flushed before the failure is kept
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not any(p._backward_hooks for p in model.parameters())
