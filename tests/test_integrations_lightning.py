"""The Lightning callback, with the real `lightning` package on the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402


class Tiny(L.LightningModule):
    """Records, in on_before_optimizer_step, the total norm Lightning's utility gives."""

    def __init__(self, manual: bool = False, optimizers: int = 1, poison_from: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.automatic_optimization = not manual
        self.n_optimizers = optimizers
        self.poison_from = poison_from
        self.norms: list[float] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.poison_from is not None and self.global_step >= self.poison_from:
            x = x * float("nan")
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(grad_norm(self, norm_type=2)["grad_2.0_norm_total"].item())

    def configure_optimizers(self):
        make = lambda: torch.optim.SGD(self.parameters(), lr=0.5)  # noqa: E731
        return make() if self.n_optimizers == 1 else [make() for _ in range(self.n_optimizers)]


def fit(callbacks=(), steps=8, module=None, **trainer_options):
    torch.manual_seed(0)
    module = module or Tiny()
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(128, 6, generator=generator), torch.randint(0, 3, (128,), generator=generator)
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        **trainer_options,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer, module


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_clip_val": 0.05}, {"accumulate_grad_batches": 2}],
    ids=["plain", "clipped", "accumulated"],
)
def test_global_grad_norm_is_lightnings_pre_clip_total_norm(tmp_path, options):
    trainer, module = fit([GradwatchCallback(run_dir=tmp_path / "run", probe_every=2)], **options)
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(8))  # one row per optimizer step
    np.testing.assert_allclose(run.series("global_grad_norm"), module.norms, rtol=1e-5)
    assert run.tensors == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert trainer.gradient_clip_val == options.get("gradient_clip_val")  # restored


def test_the_loss_of_training_step_is_stored(tmp_path):
    _, module = fit([GradwatchCallback(run_dir=tmp_path / "run")])
    np.testing.assert_allclose(
        gw.open_run(tmp_path / "run").series("loss"), module.losses, rtol=1e-6
    )


def test_taking_over_the_clipping_leaves_training_unchanged(tmp_path):
    _, plain = fit(gradient_clip_val=0.05)
    _, watched = fit([GradwatchCallback(run_dir=tmp_path / "run")], gradient_clip_val=0.05)
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len([e for e in gw.open_run(tmp_path / "run").events if e.kind == "clip"]) == 8


def test_manual_optimisation_records_each_step(tmp_path):
    _, module = fit([GradwatchCallback(run_dir=tmp_path / "run")], module=Tiny(manual=True))
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(8))
    np.testing.assert_allclose(run.series("global_grad_norm"), module.norms, rtol=1e-5)


def test_findings_reach_lightnings_log(tmp_path, caplog):
    callback = GradwatchCallback(run_dir=tmp_path / "run", flush_every=2)
    with caplog.at_level(logging.WARNING, logger="lightning.pytorch"):
        fit([callback], module=Tiny(poison_from=3))
    found = [
        r.getMessage()
        for r in caplog.records
        if r.name == "lightning.pytorch" and "gradwatch finding" in r.getMessage()
    ]
    assert len(found) == 1 and "nonfinite" in found[0] and "step 3" in found[0]


class TwoNets(L.LightningModule):
    """A GAN-like module: two submodules, two optimizers, manual optimisation."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
        self.critic = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        self.automatic_optimization = False
        self.norms: dict[int, list[float]] = {0: [], 1: []}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        g_opt, c_opt = self.optimizers()
        critic_loss = self.critic(self.generator(x).detach()).mean() - self.critic(x).mean()
        c_opt.zero_grad()
        self.manual_backward(critic_loss)
        c_opt.step()
        generator_loss = -self.critic(self.generator(x)).mean()
        g_opt.zero_grad()
        self.manual_backward(generator_loss)
        g_opt.step()

    def on_before_optimizer_step(self, optimizer):
        # Lightning passes the torch optimizer; self.optimizers() wraps each one
        index = [o.optimizer for o in self.optimizers()].index(optimizer)
        owner = (self.generator, self.critic)[index]
        total = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in owner.parameters() if p.grad is not None])
        )
        self.norms[index].append(total.item())

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.1),
                torch.optim.SGD(self.critic.parameters(), lr=0.1)]  # fmt: skip


def test_several_optimizers_get_one_store_each_on_their_submodule(tmp_path):
    _, module = fit([GradwatchCallback(run_dir=tmp_path / "run")], steps=12, module=TwoNets())
    generator, critic = gw.open_run(tmp_path / "run"), gw.open_run(tmp_path / "run-optimizer1")
    assert generator.tensor_info[0]["shape"] == (8, 6) and critic.tensor_info[-1]["shape"] == (1,)
    assert len(generator.steps) == len(critic.steps) == 6  # 12 optimizer steps, 2 per batch
    np.testing.assert_allclose(generator.series("global_grad_norm"), module.norms[0], rtol=1e-5)
    np.testing.assert_allclose(critic.series("global_grad_norm"), module.norms[1], rtol=1e-5)


class SharedByTwo(Tiny):
    """Two optimizers over the same parameters, stepped one after the other."""

    def __init__(self) -> None:
        super().__init__(manual=True, optimizers=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            loss = nn.functional.cross_entropy(self.net(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.losses.append(loss.item())


def test_optimizers_sharing_parameters_are_reported_and_the_fit_goes_on(tmp_path, caplog):
    callback = GradwatchCallback(run_dir=tmp_path / "run")
    trainer, module = fit([callback], module=SharedByTwo())
    assert trainer.global_step == 8 and module.losses  # the fit ran to max_steps, unwatched
    reports = [r.getMessage() for r in caplog.records if "is not watched" in r.getMessage()]
    assert len(reports) == 1
    assert "optimizers #0 and #1 update parameters of one submodule" in reports[0]
    assert callback.watchers == [] and not (tmp_path / "run").exists()


class Failing(Tiny):
    failing = True

    def training_step(self, batch, batch_idx):
        if self.failing and self.global_step == 3:
            raise KeyError("the user's training_step failed")
        return super().training_step(batch, batch_idx)


def test_a_failed_fit_restores_the_clipping_and_leaves_nothing_watched(tmp_path):
    callback = GradwatchCallback(run_dir=tmp_path / "run")
    module = Failing()
    with pytest.raises(KeyError, match="the user's training_step failed"):
        fit([callback], module=module, gradient_clip_val=0.05)
    assert callback.watchers == []
    first = gw.open_run(tmp_path / "run")
    assert first.closed and list(first.steps) == [0, 1, 2]
    # the same module fits again, watched (it was "already watched" while the watcher leaked)
    module.failing = False
    fit([GradwatchCallback(run_dir=tmp_path / "again")], module=module)
    assert list(gw.open_run(tmp_path / "again").steps) == list(range(8))


def test_a_failed_fit_gives_the_trainer_its_clipping_back(tmp_path):
    callback = GradwatchCallback(run_dir=tmp_path / "run")
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        gradient_clip_val=0.05,
    )  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    with pytest.raises(KeyError):
        trainer.fit(Failing(), torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.gradient_clip_val == 0.05


class RecordingSink:
    def __init__(self) -> None:
        self.blocks, self.closes, self.after_close = 0, 0, 0

    def write_block(self, block, tensors, modules) -> None:
        self.blocks += 1
        self.after_close += self.closes > 0

    def write_findings(self, findings) -> None:
        self.after_close += self.closes > 0

    def close(self) -> None:
        self.closes += 1


def test_a_sink_shared_by_two_optimizers_is_closed_once_after_both(tmp_path):
    sink = RecordingSink()
    fit([GradwatchCallback(run_dir=tmp_path / "run", sinks=[sink])], steps=12, module=TwoNets())
    assert sink.blocks == 2  # one flush per optimizer's watcher, at its close
    assert sink.closes == 1 and sink.after_close == 0
