"""Lightning: `Trainer(callbacks=[GradwatchCallback(run_dir=...)])` (the `lightning` package, 2.x).

The callback calls `gw.watch` on the LightningModule (names are its own) and its optimizer when
fitting starts, and closes the watcher when it ends. Lightning runs `optimizer.step(closure)`:
gradwatch records the gradients the closure made, once per optimizer step (with
`accumulate_grad_batches` too), in automatic and manual optimisation.

Lightning clips right after the closure's backward, before gradwatch could record, so with
`gradient_clip_val` the callback takes the clipping over for the fit: it sets
`trainer.gradient_clip_val` to None and puts `gw.guards.ClipNorm(val)` (algorithm "norm") or
`gw.guards.ClipValue(val)` ("value") first among the guards, the same rules, applied right after
gradwatch records the step. So `global_grad_norm` is the pre-clip total norm that
`lightning.pytorch.utilities.grad_norm` gives in `on_before_optimizer_step`; the setting is
restored when fitting ends. A `configure_gradient_clipping` of your own that clips without
`gradient_clip_val` still runs before gradwatch records.

The loss that `training_step` returns is stored as `loss` at each optimizer step (the last
micro-batch's, with accumulation). Findings go to Lightning's log (the `lightning.pytorch` logger)
once each, and to the run store. One optimizer per LightningModule: several optimizers (GANs)
are refused with a clear error for now. Needs `lightning` (`pip install 'gradwatch[lightning]'`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradwatch as gw
from gradwatch.extras import optional

_lightning = optional("lightning.pytorch", "gradwatch's Lightning callback")


class GradwatchCallback(_lightning.Callback):
    """Watch the gradients of a Lightning fit with `gw.watch`.

    Args:
        run_dir: where the run store goes (default: `runs/<date-time>`, as `gw.watch`).
        guards: guards applied after Lightning's clipping rule (see the module docstring).
        sinks: extra sinks; Lightning's log always receives the findings.
        watch_options: `every`, `probe_every`, `flush_every`, as for `gw.watch`.

    `watcher` is the open `gw.Watcher` while fitting (None before and after).
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        guards: Iterable[Any] = (),
        sinks: Iterable[Any] = (),
        **watch_options: Any,
    ) -> None:
        self.run_dir = run_dir
        self.guards = list(guards)
        self.sinks = list(sinks)
        self.watch_options = watch_options
        self.watcher: gw.Watcher | None = None
        self._clip_val: float | None = None
        self._logged_step = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"GradwatchCallback watches a LightningModule with one optimizer; this one "
                f"configures {len(optimizers)}. Several optimizers are not supported yet"
            )
        guards = list(self.guards)
        if trainer.gradient_clip_val:
            self._clip_val = trainer.gradient_clip_val
            algorithm = str(trainer.gradient_clip_algorithm or "norm").lower()
            clip = gw.guards.ClipValue if algorithm.endswith("value") else gw.guards.ClipNorm
            guards.insert(0, clip(self._clip_val))
            trainer.gradient_clip_val = None  # gradwatch clips, right after it records the step
        self.watcher = gw.watch(
            pl_module,
            optimizers[0],
            run_dir=self.run_dir,
            guards=guards,
            sinks=[gw.sinks.Logger("lightning.pytorch"), *self.sinks],
            **self.watch_options,
        )
        self._logged_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.watcher is None or trainer.global_step == self._logged_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._logged_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.watcher.log(loss=loss.detach())

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._clip_val is not None:
            trainer.gradient_clip_val = self._clip_val
            self._clip_val = None
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
