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
restored when fitting ends or fails (`on_exception`), and is not touched when the fit cannot be
watched (reported in Lightning's log; the fit goes on unwatched). A
`configure_gradient_clipping` of your own that clips without `gradient_clip_val` still runs
before gradwatch records.

Several optimizers (a GAN's generator and discriminator, in manual optimisation): one watcher
and one run store per optimizer, in the order `configure_optimizers` returns them, the first at
`run_dir`, the k-th after it at `run_dir`-optimizer<k>; each watches the smallest submodule that
holds all of its optimizer's parameters, so its names are relative to that submodule (the
generator's `0.weight`). Optimizers that share a submodule's parameters are refused with a clear
error. With one optimizer the LightningModule itself is watched and names are its own.

The loss that `training_step` returns is stored as `loss` at each optimizer step (the last
micro-batch's, with accumulation). Findings go to Lightning's log (the `lightning.pytorch` logger)
once each, and to the run store. Needs `lightning` (`pip install 'gradwatch[lightning]'`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

import gradwatch as gw
from gradwatch.extras import optional
from gradwatch.integrations.settings import WatchSettings, report_unwatched
from gradwatch.inventory import optimizer_parameters

_lightning = optional("lightning.pytorch", "gradwatch's Lightning callback")
logger = logging.getLogger("gradwatch")


class GradwatchCallback(_lightning.Callback):
    """Watch the gradients of a Lightning fit with `gw.watch`.

    Args:
        run_dir: where the run store goes (default: `runs/<date-time>`, as `gw.watch`).
        guards: guards applied after Lightning's clipping rule (see the module docstring).
        sinks: extra sinks; Lightning's log always receives the findings.
        watch_options: `every`, `probe_every`, `flush_every`, as for `gw.watch`.

    `watchers` are the open `gw.Watcher`s while fitting, one per optimizer (empty before and
    after); `watcher` is the first.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        guards: Iterable[Any] = (),
        sinks: Iterable[Any] = (),
        **watch_options: Any,
    ) -> None:
        self.settings = WatchSettings(run_dir, guards, sinks, watch_options)
        self.watchers: list[gw.Watcher] = []
        self._clip_val: float | None = None
        self._logged_step = 0

    @property
    def watcher(self) -> gw.Watcher | None:
        return self.watchers[0] if self.watchers else None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Watch each optimizer; a set-up gradwatch cannot watch is reported in Lightning's log
        and the fit goes on unwatched, with its own clipping."""
        self._finish(trainer)  # a fit that failed before left nothing open: this is a guard
        try:
            self.watchers = self._watch(trainer, pl_module)
        except Exception as exc:
            report_unwatched("lightning.pytorch", "this fit", exc)
            return
        self._logged_step = trainer.global_step
        if self._clip_val is not None:
            trainer.gradient_clip_val = None  # gradwatch clips, right after it records the step

    def _watch(self, trainer: Any, pl_module: Any) -> list[gw.Watcher]:
        optimizers = list(trainer.optimizers)
        owners = [_owner(pl_module, o) if len(optimizers) > 1 else pl_module for o in optimizers]
        for i, owner in enumerate(owners):
            for j, other in enumerate(owners[:i]):
                if _shares(owner, other):
                    raise ValueError(
                        f"optimizers #{j} and #{i} update parameters of one submodule; "
                        "GradwatchCallback watches each optimizer on a submodule of its own"
                    )
        clipping = []
        if trainer.gradient_clip_val:
            algorithm = str(trainer.gradient_clip_algorithm or "norm").lower()
            clip = gw.guards.ClipValue if algorithm.endswith("value") else gw.guards.ClipNorm
            clipping.append(clip(trainer.gradient_clip_val))
        watchers: list[gw.Watcher] = []
        try:
            for i, (owner, optimizer) in enumerate(zip(owners, optimizers, strict=True)):
                watchers.append(
                    self.settings.watch(owner, optimizer, "lightning.pytorch", i, clipping)
                )
        except BaseException:
            for watcher in watchers:
                watcher.close()
            raise
        self._clip_val = trainer.gradient_clip_val or None
        return watchers

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.watchers or trainer.global_step == self._logged_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._logged_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            for watcher in self.watchers:
                watcher.log(loss=loss.detach())

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A failed fit leaves nothing changed: the clipping setting restored, the watchers
        closed (with what they recorded), so the next fit starts clean."""
        self._finish(trainer)

    def _finish(self, trainer: Any) -> None:
        if self._clip_val is not None:
            trainer.gradient_clip_val = self._clip_val
            self._clip_val = None
        watchers, self.watchers = self.watchers, []
        for watcher in watchers:
            try:
                watcher.close()
            except Exception as exc:  # the fit's own outcome matters more
                logger.error("gradwatch: closing the run %s failed: %r", watcher.run_dir, exc)


def _owner(module: nn.Module, optimizer: Any) -> nn.Module:
    """The smallest submodule of `module` that holds every parameter `optimizer` updates."""
    wanted = {id(p) for p in optimizer_parameters(optimizer)}
    best, size = module, sum(1 for _ in module.parameters())
    for _, sub in module.named_modules():
        held = {id(p) for p in sub.parameters()}
        if wanted <= held and len(held) < size:
            best, size = sub, len(held)
    return best


def _shares(a: nn.Module, b: nn.Module) -> bool:
    return bool({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})
