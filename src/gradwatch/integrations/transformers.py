"""Hugging Face Trainer: `Trainer(..., callbacks=[GradwatchCallback(run_dir=...)])`.

The callback calls `gw.watch` on the Trainer's model and optimizer when training begins and closes
the watcher when it ends. The Trainer clips the gradients before any callback sees them, so the
callback takes the clipping over: for the run it sets `args.max_grad_norm` to 0 and puts
`gw.guards.ClipNorm(max_grad_norm)` first among the guards, which applies the same rule
(`clip_grad_norm_`'s) right after gradwatch records the step. So gradwatch's statistics are those
of the pre-clip gradients, `global_grad_norm` equals the `grad_norm` the Trainer logs (it then
measures the gradients unclipped, after unscaling under AMP), and the updates are the Trainer's
own. `args.max_grad_norm` is restored when training ends. The Trainer tells callbacks nothing when
`train()` fails: the next `train()` then first closes the watcher left open and restores
`args.max_grad_norm` (until then it reads 0). A set-up gradwatch cannot watch is reported in the
Trainer's log and training goes on unwatched, with its own clipping.

With gradient accumulation a recorded step is an optimizer step, whose statistics pool its
micro-batches. The Trainer's logged `loss` (averaged over `logging_steps`) is stored as `loss` at
the step it was logged at. Findings go to the Trainer's log (the `transformers.trainer` logger)
once each, and to the run store. Needs `transformers` and `accelerate`
(`pip install 'gradwatch[transformers]'`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradwatch as gw
from gradwatch.extras import optional
from gradwatch.integrations.settings import WatchSettings, report_unwatched

_transformers = optional("transformers", "gradwatch's Hugging Face Trainer callback")
logger = logging.getLogger("gradwatch")


class GradwatchCallback(_transformers.TrainerCallback):
    """Watch the gradients of a Hugging Face `Trainer` run with `gw.watch`.

    Args:
        run_dir: where the run store goes (default: `runs/<date-time>`, as `gw.watch`).
        guards: guards applied after the Trainer's clipping rule (see the module docstring).
        sinks: extra sinks; the Trainer's log always receives the findings.
        watch_options: `every`, `probe_every`, `flush_every`, as for `gw.watch`.

    `watcher` is the open `gw.Watcher` during training (None before and after).
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        guards: Iterable[Any] = (),
        sinks: Iterable[Any] = (),
        **watch_options: Any,
    ) -> None:
        self.settings = WatchSettings(run_dir, guards, sinks, watch_options)
        self.watcher: gw.Watcher | None = None
        self._max_grad_norm: float | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        """Watch the model and optimizer; a set-up gradwatch cannot watch is reported in the
        Trainer's log and training goes on unwatched, with its own clipping."""
        self._finish(args)  # a train() that failed left its watcher open: close it first
        try:
            if model is None or optimizer is None:
                raise ValueError("the Trainer passed no model or optimizer to the callback")
            clipping = []
            if args.max_grad_norm is not None and args.max_grad_norm > 0:
                clipping.append(gw.guards.ClipNorm(args.max_grad_norm))
            self.watcher = self.settings.watch(
                model,
                getattr(optimizer, "optimizer", optimizer),  # under accelerate's wrapper
                "transformers.trainer",
                clipping=clipping,
            )
        except Exception as exc:
            report_unwatched("transformers.trainer", "this training run", exc)
            return
        if clipping:
            self._max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0  # gradwatch clips, right after it records the step

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.watcher is not None and logs and "loss" in logs:
            self.watcher.log(loss=logs["loss"])

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._finish(args)

    def _finish(self, args: Any) -> None:
        if self._max_grad_norm is not None:
            args.max_grad_norm = self._max_grad_norm
            self._max_grad_norm = None
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            try:
                watcher.close()
            except Exception as exc:  # the training's own outcome matters more
                logger.error("gradwatch: closing the run %s failed: %r", watcher.run_dir, exc)
