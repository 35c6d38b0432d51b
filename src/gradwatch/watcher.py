"""`gw.watch()`: the story of one training step, told by the hooks gradwatch attaches.

optimizer.step()
  step pre-hook   the gradient statistics of this step go into a device buffer row; on probe steps
                  the parameters are copied (θ_before)
  (update)
  step post-hook  on probe steps ‖θ_after − θ_before‖ / ‖θ_before‖; the step counter moves on
every `flush_every` recorded steps the buffer goes to the host with one copy, and the writer thread
commits it to the run store. Nothing in the step path (`step_recorder.py`) waits for the host.

Under torch.distributed (see `distributed.py`) every rank runs the same hooks on its own batch or
shard; the flush combines the ranks' partial statistics with a few all-reduces, and only global
rank 0 writes the store.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import (
    WatchConfig,
    check_model_and_optimizer,
    label_guards,
)
from gradwatch.detect.findings import Finding
from gradwatch.distributed import (
    Topology,
    collective_device,
    topology,
    unwrap,
)
from gradwatch.guards.base import Guard, StopTraining
from gradwatch.inventory import Inventory
from gradwatch.probe_records import ProbeRecords
from gradwatch.publishing import Publisher, learning_rates
from gradwatch.recorded_block import RecordedBlock
from gradwatch.run_start import fingerprint, open_store, run_meta
from gradwatch.sinks.base import Sink
from gradwatch.stats.flow import ModuleProbes
from gradwatch.stats.hooks import Failsafe, eager_unless_traced, mark_eager_hooks
from gradwatch.step_recorder import StepRecorder

logger = logging.getLogger("gradwatch")

_watched_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Watcher:
    """Watches the gradients of one model; returned by `gw.watch()`. Use it as a context manager.

    Without an optimizer, call `step()` after each update; with one, gradwatch counts steps inside
    `optimizer.step()`. `log(**scalars)` attaches scalars to the current step, `findings()` lists
    what was diagnosed, `close()` flushes and removes every hook. Under torch.distributed every
    rank calls the same methods at the same steps; `findings()` lists them on rank 0, which
    writes the store, and is empty elsewhere.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: WatchConfig,
        guards: Sequence[Guard] = (),
        sinks: Sequence[Sink] = (),
    ) -> None:
        model, self._topology = _checked(model, optimizer, config)
        self._guards = label_guards(guards, optimizer)
        self._failsafe = Failsafe(
            f"the watcher of run_dir {config.run_dir!r}", passes=(StopTraining,)
        )
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.inventory = inventory = Inventory(model)
        topo = self._topology
        self._collective_device = device = collective_device(topo, inventory.device)
        identity = fingerprint(config, self._guards, inventory)
        self._writer = open_store(topo, config.run_dir, identity, device)
        self.run_dir = Path(config.run_dir)
        shield = self._failsafe.shield
        self._module_probes = ModuleProbes(
            model, inventory.device, topo.ranks, topo.rank, topo.world_size, shield=shield
        )
        self._probe_records = ProbeRecords(
            model, inventory, self._module_probes, topo, config, shield=shield
        )
        self._publisher = Publisher(self._writer, self._guards, sinks)  # starts at 1st flush
        modules = len(self._module_probes.names)
        self._block = RecordedBlock(inventory, modules, config.flush_every, topo, device)
        probes = (self._module_probes, self._probe_records)
        self._recorder = StepRecorder(
            model, optimizer, config, inventory, topo, self._guards, self._block, probes,
            flush=self._flush, write_event=self._write_event, shield=shield,
        )  # fmt: skip
        self._hooks: list[Any] = []
        self._closed = False

        self._writer.write_meta(run_meta(model, optimizer, config, self.inventory, self._topology))
        self._writer.write_tensors(self.inventory.tensors)
        self._attach()
        mark_eager_hooks()  # before any hook can run under torch.compile (imports dynamo)
        _watched_models.add(model)
        atexit.register(self._close_at_exit)

    # ---- public API --------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps completed since `watch()`."""
        return self._recorder.step

    @property
    def rank(self) -> int:
        """This process's global rank (0 in a single process); rank 0 writes the store."""
        return self._topology.rank

    def step(self) -> None:
        """Mark the end of one update when watching without an optimizer (`gw.watch(model)`).

        Records the statistics of the gradients as they are now. No host sync.
        """
        if not self._open():
            return
        if self.optimizer is not None:
            raise RuntimeError(
                "Watcher.step() is for gw.watch(model) without an optimizer; this watcher counts "
                "steps inside optimizer.step() already, so remove the call"
            )
        self._failsafe.shield(self._recorder.manual_step)()

    def log(self, **scalars: float | Tensor) -> None:
        """Attach scalars (loss, lr, ...) to the current step: with an optimizer, the step that
        `optimizer.step()` last completed (call `log` after it); without one, the step that the
        next `step()` closes. One-element tensors stay on the device: no host sync.
        Scalars of steps that are not recorded (see `every`) are dropped.
        """
        if not self._open():
            return
        if "loss" in scalars:  # Rollback watches the latest loss, recorded step or not
            loss = scalars["loss"]
            self._recorder.last_loss = loss.detach() if isinstance(loss, Tensor) else loss
        step = self._recorder.step
        target = step - 1 if self.optimizer is not None and step > 0 else step
        if not self.config.records(target):
            return
        row = self._block.row_of(target)
        if row is None:
            if target != step:
                return  # that step's row was flushed already
            row = self._recorder.open_row(target)
        for name, value in scalars.items():
            self._block.record_scalar(row, name, value)

    def findings(self) -> list[Finding]:
        """The findings diagnosed in the flushed blocks (all of them once the watcher is closed).

        Waits for the writer thread to finish the blocks handed to it: call it off the hot loop.
        """
        if not self._closed:
            self._writer.drain()
        return self._publisher.findings()

    def state_dict(self) -> dict[str, Any]:
        """The step counter and every guard's state, to resume a run where it stopped
        (save it with your checkpoint; load it into the watcher of the resumed run)."""
        return {
            "step": self._recorder.step,
            "guards": {g.label: g.state_dict() for g in self._guards},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the step counter and the guards' state."""
        missing = {g.label for g in self._guards} - set(state.get("guards", {}))
        if missing:
            raise ValueError(
                f"the state has no entry for guard(s) {sorted(missing)}; it was saved from a "
                f"watcher with guards {sorted(state.get('guards', {}))}"
            )
        self._recorder.set_step(int(state["step"]))
        for guard in self._guards:
            guard.load_state_dict(state["guards"][guard.label])

    def flush(self) -> None:
        """Hand the recorded steps to the run store now (also done every `flush_every` steps)."""
        if self._open():
            self._failsafe.shield(self._flush)()

    def close(self) -> None:
        """Flush, wait until the store holds everything, and remove every hook. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._module_probes.detach()
        self._probe_records.detach()
        self._recorder.snapshot = None
        _watched_models.discard(self.model)
        try:
            self._flush()
            self._block.check_last_flush()
            self._writer.drain()  # the last block's findings are queued while it is written
            self._writer.write_meta({"closed": True, "steps_completed": self._recorder.step})
        finally:
            self._writer.close()
            self._publisher.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the step path -----------------------------------------------------------------------
    def _attach(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._close_if_failed))
        self._module_probes.attach()
        self._probe_records.attach()
        if self.optimizer is not None:
            self._hooks.append(
                self.optimizer.register_step_pre_hook(
                    self._step_hook(self._recorder.before_update_hook)
                )
            )
            self._hooks.append(
                self.optimizer.register_step_post_hook(self._step_hook(self._after_update))
            )
        self._recorder.start()

    def _write_event(self, event: Any) -> None:
        self._writer.write_events([event])

    def _after_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The step post-hook."""
        self._recorder.after_update()

    def _flush(self) -> None:
        """Hand the recorded steps to the writer thread (the first flush starts the diagnosis)."""
        if not self._block.steps:
            return
        if not self._publisher.started:
            self._publisher.start(
                self.inventory,
                self._module_probes,
                self._topology.world_size,
                learning_rates(self.optimizer, self.inventory),
            )
        assert self._publisher.module_order is not None
        block = self._block.take(self._publisher.module_order, self._probe_records.take())
        if block is not None:
            self._writer.write_block(block)

    # ---- set-up helpers ----------------------------------------------------------------------
    def _open(self) -> bool:
        """Whether the watcher records. False once gradwatch's own code failed (the watcher
        then closes itself, and calls become no-ops: the training goes on); a RuntimeError
        after the user closed it."""
        if self._failsafe.tripped:
            self._close_after_failure()
            return False
        if self._closed:
            raise RuntimeError("this Watcher is closed; call gw.watch() again to keep watching")
        return True

    def _step_hook(self, hook: Any) -> Any:
        """`hook` shielded by the failsafe, for the optimizer. It cannot close the watcher
        itself: torch iterates the optimizer's hooks live, and removing one there raises in the
        user's `optimizer.step()` when another hook follows. The watcher closes in
        `_close_if_failed` instead."""
        return self._failsafe.shield(hook)

    def _close_if_failed(self, module: nn.Module, args: Any) -> None:
        """A forward pre-hook on the model: the first safe point after a failure, where the
        watcher closes (a module's hooks are called from a copy, so removing them is safe)."""
        if self._failsafe.tripped:
            self._close_after_failure()

    def _close_after_failure(self) -> None:
        """Close after a failure of gradwatch's own code: note it in the store, flush what is
        recorded, remove every hook; report, never raise (DESIGN invariant 8)."""
        if self._closed:
            return
        error = self._failsafe.error
        self._block.drop_step(self._recorder.step)  # the failing step's row is half written
        try:
            first_line = str(error).splitlines()[0][:300] if str(error) else ""
            self._writer.write_meta(
                {"failed": f"{self._failsafe.where}: {type(error).__name__}: {first_line}"}
            )
            self.close()
        except Exception as exc:
            logger.error("gradwatch: closing the run after that failure failed too: %r", exc)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:  # the interpreter is exiting: report, do not mask the exit
            logger.error("gradwatch: closing the run at exit failed: %s", exc)


eager_unless_traced(Watcher._close_if_failed)


def _checked(model: nn.Module, optimizer: Any, config: WatchConfig) -> tuple[nn.Module, Topology]:
    """The model to watch (unwrapped from DDP) and how the run is spread, once the model, the
    optimizer and the schedule are usable and no open watcher has the model; raises with what
    to change otherwise."""
    check_model_and_optimizer(unwrap(model), optimizer)
    topo = topology(model)
    model = unwrap(model)
    if model in _watched_models:
        raise RuntimeError(
            f"this {type(model).__name__} is already watched by an open Watcher; close it first"
        )
    return model, topo


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run_dir: str | Path | None = None,
    every: int = 1,
    probe_every: int | None = 10,
    flush_every: int = 50,
    histogram_every: int | None = 10,
    per_example: bool | str = False,
    guards: Iterable[Guard] = (),
    sinks: Iterable[Sink] = (),
) -> Watcher:
    """Watch the gradients of `model` while it trains; returns a `Watcher` (a context manager).

    Args:
        model: the module whose parameters are watched (trainable ones, in `named_parameters()`
            order).
        optimizer: the optimizer that updates them; gradwatch hooks its `step()`. Without one, call
            `Watcher.step()` after each update.
        run_dir: where the run store goes; a new directory. Default: `runs/<date-time>`.
        every: record every n-th step (the schedule: see `WatchConfig` for what each costs).
        probe_every: every n-th step is a probe step (None: no probe steps).
        flush_every: steps per block kept on the device before it is written.
        histogram_every: every n-th probe step also counts histograms (None: none).
        per_example: per-example gradient norms and the noise scale on probe steps (True or
            "mean" for a batch-mean loss, "sum" for a summed one), see `WatchConfig`.
        guards: guards applied to the gradients before each update, in order.
        sinks: extra destinations for the statistics (the run store is always written).

    Raises at call time (never mid-training) when the model, optimizer, run_dir or schedule is
    unusable, with a message that says what to change.
    """
    if run_dir is None:
        run_dir = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    config = WatchConfig(
        str(run_dir),
        every=every,
        probe_every=probe_every,
        flush_every=flush_every,
        histogram_every=histogram_every,
        per_example=per_example,
    )
    return Watcher(model, optimizer, config, guards=list(guards), sinks=list(sinks))
