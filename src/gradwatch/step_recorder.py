"""The step path of a watcher (`watcher.py`): what one optimizer step leaves in the recorded
block.

Before the update: the gradient statistics go into the step's buffer row (on probe steps with
the probe records), the guards act on the gradients, and on probe steps the parameters are
copied (θ_before). After it: on probe steps ‖θ_after − θ_before‖ / ‖θ_before‖ and Adam's ε
share; the step counter moves on, and the probes learn what the next forward pass belongs to.
Nothing here waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.distributed import Topology
from gradwatch.guards.base import Guard, GuardContext
from gradwatch.inventory import Inventory
from gradwatch.probe_records import ProbeRecords
from gradwatch.recorded_block import GLOBAL_GRAD_NORM, RecordedBlock
from gradwatch.stats.flow import ModuleProbes, ProbeMode
from gradwatch.stats.grads import ADAM_EPS_FRAC, GradStatistics, PresentGroup, global_norm
from gradwatch.stats.hooks import Shield, unshielded
from gradwatch.stats.optimizer_state import AdamEpsilon


class StepRecorder:
    """Records each step of one watched model into `block` (see the module docstring); `flush`
    hands a full block on, `write_event` stores a guard's event."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: WatchConfig,
        inventory: Inventory,
        topology: Topology,
        guards: list[Guard],
        block: RecordedBlock,
        probes: tuple[ModuleProbes, ProbeRecords],
        flush: Callable[[], None],
        write_event: Callable[[Any], None],
        shield: Shield = unshielded,
    ) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.inventory, self._topology, self._guards = inventory, topology, guards
        self._block = block
        self._module_probes, self._probe_records = probes
        self._flush, self._write_event = flush, write_event
        self._shield = shield
        self.statistics = GradStatistics(inventory, sharded=topology.sharded)
        self._adam = AdamEpsilon(optimizer, inventory) if optimizer is not None else None
        self.last_loss: Tensor | float | None = None  # Rollback watches the latest loss
        self.snapshot: list[list[Tensor]] | None = None
        self.step = 0
        self.set_step(0)

    def start(self) -> None:
        """Without an optimizer: θ now is θ_before of step 0 if that is a probe step."""
        if self.optimizer is None and self.config.probes(0):
            self.snapshot = self.statistics.snapshot_params()

    def manual_step(self) -> None:
        """What `Watcher.step()` records: this update's statistics; then the step counter moves
        on."""
        if self.config.records(self.step):
            row = self.open_row(self.step)
            self._record_grads(self.statistics.present(), row, self.step)
            if self.snapshot is not None and self.config.probes(self.step):
                self._record_update()
        self.set_step(self.step + 1)
        self.snapshot = None
        if self.config.probes(self.step):  # θ now is θ_before of the next (probe) step
            self.snapshot = self.statistics.snapshot_params()

    def before_update_hook(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        """The step pre-hook. With `optimizer.step(closure)` the gradients do not exist yet: the
        closure makes them. Then the hook hands the optimizer a closure that records them (and
        lets the guards act) right after the closure's first call of the step."""
        # `args` are step()'s positional arguments, the optimizer itself first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.before_update()
            return None
        recording = self._recording_closure(closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": recording}
        return (args[0], recording, *args[2:]), kwargs

    def _recording_closure(self, closure: Any) -> Any:
        """`closure`, recording the gradients it makes on its first call (LBFGS calls it again
        during its line search: those are not this step's gradients)."""
        first = True

        record = self._shield(self.before_update)

        def recording() -> Any:
            nonlocal first
            loss = closure()  # the user's: its exceptions are the user's
            if first:
                first = False
                record()
            return loss

        return recording

    def before_update(self) -> None:
        """This step's gradient statistics, the guards, and θ_before on probe steps."""
        step = self.step
        present = self.statistics.present()
        row = self.open_row(step) if self.config.records(step) else None
        if row is not None or self._guards:
            norm = self._record_grads(present, row, step)
            if self._guards:
                self._apply_guards(step, present, global_norm(norm, self._topology.shards), row)
        if self.config.probes(step):  # after the guards: a rollback changes θ_before
            self.snapshot = self.statistics.snapshot_params()

    def after_update(self) -> None:
        """After the update: its ratios on probe steps; the step counter moves on."""
        if self.snapshot is not None:
            self._record_update()
            self.snapshot = None
        self.set_step(self.step + 1)

    def _record_grads(self, present: list[PresentGroup], row: int | None, step: int) -> Tensor:
        """Gradient statistics into `row` (if the step is recorded); the pre-guard global norm of
        this rank's gradients (of its shards, under FSDP2)."""
        self._probe_records.end_forward()
        probe = self.config.probes(step)
        norm = self.statistics.record_grads(
            present,
            None if row is None else self._block.tensor_rows.data[row],
            probe=probe,
            device=self.inventory.device,
        )
        if row is not None:
            self._block.record_scalar(row, GLOBAL_GRAD_NORM, norm)
            act_hist = self._module_probes.write(self._block.module_rows.data[row], probe)
            if act_hist is not None:
                self._probe_records.record(
                    step,
                    present,
                    self.statistics,
                    act_hist,
                    (self._block.tensor_rows.data[row], self._block.module_rows.data[row]),
                    histograms=self.config.histograms(step),
                    record=lambda name, value: self._block.record_scalar(row, name, value),
                )
        return norm

    def _apply_guards(
        self, step: int, present: list[PresentGroup], global_norm: Tensor, row: int | None
    ) -> None:
        names = self.inventory.names
        ctx = GuardContext(
            step=step,
            groups=[([names[i] for i in g.index], g.params, g.grads) for g in present],
            global_norm=global_norm,
            optimizer=self.optimizer,
            model=self.model,
            loss=self.last_loss,
            record=lambda name, value: self._block.record_scalar(row, name, value),
            event=lambda event: self._write_event(event),
            shards=self._topology.shards,
            ranks=self._topology.ranks,
        )
        for guard in self._guards:
            if ctx.skipped and not guard.runs_on_skipped_steps:
                continue
            guard.apply(ctx)

    def _record_update(self) -> None:
        assert self.snapshot is not None
        row = self._block.tensor_rows.data[len(self._block.steps) - 1]
        self.statistics.record_update(row, self.snapshot)
        found = self._adam.shares(row.device) if self._adam is not None else None
        if found is not None:
            row[:, ADAM_EPS_FRAC].index_copy_(0, *found)

    def set_step(self, step: int) -> None:
        """Move the step counter; tell the module probes what the next forward pass belongs to
        (the forward of step s runs while the counter is s, with or without an optimizer)."""
        self.step = step
        self._module_probes.mode = (
            ProbeMode.PROBE
            if self.config.probes(step)
            else ProbeMode.RECORD
            if self.config.records(step)
            else ProbeMode.IDLE
        )
        self._probe_records.set_step(self.config.probes(step), self.config.histograms(step))

    def open_row(self, step: int) -> int:
        """The buffer row of `step`, flushing a full block first."""
        if self._block.row_of(step) is None and self._block.full:
            self._flush()
        return self._block.open_row(step)
