"""The Hugging Face Trainer callback, with the real Trainer (transformers + accelerate), a tiny
random-init GPT-2 and no download."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, 12), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fit(tmp_path, callbacks=(), accumulation=1, max_grad_norm=1.0, lr=5e-3, prepare=None):
    trainer = trainer_for(tmp_path, callbacks, accumulation, max_grad_norm, lr, prepare)
    trainer.train()
    return trainer


def trainer_for(tmp_path, callbacks=(), accumulation=1, max_grad_norm=1.0, lr=5e-3, prepare=None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    if prepare is not None:
        prepare(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, learning_rate=lr, max_grad_norm=max_grad_norm,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks)
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_global_grad_norm_equals_the_trainers_logged_grad_norm(tmp_path, accumulation):
    callback = GradwatchCallback(run_dir=tmp_path / "run", probe_every=2)
    trainer = fit(tmp_path, [callback], accumulation)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    run = gw.open_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(8))
    np.testing.assert_allclose(run.series("global_grad_norm"), logged, rtol=1e-5)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(run.series("loss"), losses, rtol=1e-6)
    assert run.tensors[0] == "transformer.wte.weight"  # the model's own names
    assert trainer.args.max_grad_norm == 1.0  # restored
    assert callback.watcher is None


def test_taking_over_the_clipping_leaves_training_unchanged(tmp_path):
    # max_grad_norm 0.05 clips every step: the guard must clip exactly as the Trainer would.
    plain = fit(tmp_path / "plain", max_grad_norm=0.05)
    watched = fit(tmp_path / "watched", [GradwatchCallback(run_dir=tmp_path / "run")],
                  max_grad_norm=0.05)  # fmt: skip
    for (name, a), b in zip(
        plain.model.named_parameters(), watched.model.parameters(), strict=True
    ):
        # Same rule, different order of float32 ops: the clip coefficients differ in the last
        # bit, which Adam (lr 5e-3, 8 steps) amplifies to ~3e-7 in near-zero coordinates.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    clips = [e for e in gw.open_run(tmp_path / "run").events if e.kind == "clip"]
    assert len(clips) == 8


def test_findings_reach_the_trainers_log(tmp_path, caplog):
    backward_passes = 0

    def poison_from_step_4(model: nn.Module) -> None:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            nonlocal backward_passes
            backward_passes += 1
            return grad * float("nan") if backward_passes > 4 else grad

        model.transformer.wte.weight.register_hook(hook)

    callback = GradwatchCallback(run_dir=tmp_path / "run", flush_every=2)
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        fit(tmp_path, [callback], prepare=poison_from_step_4)
    messages = [r.getMessage() for r in caplog.records if r.name == "transformers.trainer"]
    found = [m for m in messages if m.startswith("gradwatch finding:")]
    assert len(found) == 1 and "nonfinite" in found[0] and "step 4" in found[0], messages
    assert [(f.kind, f.step) for f in gw.open_run(tmp_path / "run").findings] == [("nonfinite", 4)]


class FailOnce(transformers.TrainerCallback):
    """A callback of the user's that fails at step 3 of the first train()."""

    def __init__(self) -> None:
        self.armed = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.armed and state.global_step == 3:
            self.armed = False
            raise KeyError("a user callback failed")


def test_the_train_after_a_failed_one_is_watched_and_restores_max_grad_norm(tmp_path, monkeypatch):
    """The Trainer tells callbacks nothing when train() fails: the next train() closes the
    watcher left open and gives max_grad_norm back before taking it over again."""
    monkeypatch.chdir(tmp_path)  # the default run_dir: runs/<date-time> here
    callback = GradwatchCallback()
    trainer = trainer_for(tmp_path, [callback, FailOnce()])
    with pytest.raises(KeyError, match="a user callback failed"):
        trainer.train()
    left_open = callback.watcher
    assert left_open is not None and trainer.args.max_grad_norm == 0.0
    trainer.train()  # was: "this GPT2LMHeadModel is already watched"
    assert callback.watcher is None and trainer.args.max_grad_norm == 1.0
    first, second = sorted((tmp_path / "runs").iterdir())
    assert gw.open_run(first).closed and len(gw.open_run(first).steps) == 3
    assert gw.open_run(second).closed and len(gw.open_run(second).steps) == 8


def test_a_set_up_that_cannot_be_watched_is_reported_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "taken").write_text("a file where the run store should go")
    callback = GradwatchCallback(run_dir=tmp_path / "taken")
    trainer = fit(tmp_path, [callback])
    assert trainer.state.global_step == 8 and trainer.args.max_grad_norm == 1.0
    reports = [r.getMessage() for r in caplog.records if "is not watched" in r.getMessage()]
    assert len(reports) == 1 and "is a file" in reports[0]
