"""`Publisher`: what happens to each block once the run store's writer thread holds it: the guards'
clip events are stored, the block is diagnosed, findings are stored, logged once per cause and
passed to the sinks, and the sinks receive the block. It starts at the first flush, when the
model's layout (the modules in the order the first forward pass called them) is known.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from gradwatch.detect.diagnosis import Diagnosis
from gradwatch.detect.findings import Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.guards.base import Guard
from gradwatch.inventory import Inventory
from gradwatch.run_writer import DiscardingWriter, RunWriter
from gradwatch.sinks.base import Sink
from gradwatch.stats.buffer import StatsBlock
from gradwatch.stats.device import to_device
from gradwatch.stats.flow import ModuleProbes

logger = logging.getLogger("gradwatch")


class Publisher:
    """Diagnosis, findings and sinks of one run, fed by the writer thread."""

    def __init__(
        self, writer: RunWriter | DiscardingWriter, guards: Sequence[Guard], sinks: Sequence[Sink]
    ) -> None:
        self._writer = writer
        self._guards = guards
        self._sinks = sinks
        self._diagnosis: Diagnosis | None = None
        self._announced: set[tuple[str, str]] = set()
        self.module_order: Tensor | None = None  # set by `start`

    @property
    def started(self) -> bool:
        return self.module_order is not None

    def start(
        self,
        inventory: Inventory,
        probes: ModuleProbes,
        world_size: int,
        tensor_lr: tuple[float | None, ...],
    ) -> None:
        """At the first flush: order the modules as the first forward pass called them, store
        that order, and start the diagnosis and the sinks, which need it."""
        called = set(probes.forward_order)
        order = probes.forward_order + [c for c in range(len(probes.names)) if c not in called]
        self.module_order = to_device(order, inventory.device, torch.long)
        modules = [probes.names[c] for c in order]
        self._writer.write_modules([(probes.names[c], probes.types[c]) for c in order])
        layout = ModelLayout(
            tensors=tuple(inventory.names),
            tensor_modules=tuple(t.module for t in inventory.tensors),
            modules=tuple(modules),
            module_types=tuple(probes.types[c] for c in order),
            owns_parameters=tuple(probes.owns_parameters(c) for c in order),
            builtin=tuple(probes.builtin(c) for c in order),
            zeroing=tuple(probes.zeroing(c) for c in order),
            saturating=tuple(probes.saturating(c) for c in order),
            world_size=world_size,
            tensor_dtypes=tuple(t.dtype for t in inventory.tensors),
            module_dtypes=tuple(probes.output_dtype(c) for c in order),
            tensor_ranks=tuple(len(t.shape) for t in inventory.tensors),
            called=tuple(c in called for c in order),
            tensor_lr=tensor_lr,
        )
        self._diagnosis = Diagnosis(layout, self._publish)
        self._writer.block_listeners.append(self._diagnose)
        tensors = inventory.names
        for sink in self._sinks:
            self._writer.block_listeners.append(
                lambda block, sink=sink: sink.write_block(block, tensors, modules)
            )

    def findings(self) -> list[Finding]:
        return self._diagnosis.findings() if self._diagnosis is not None else []

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def _diagnose(self, block: StatsBlock) -> None:
        """Store the guards' clip events of the block and diagnose it with them."""
        scalars = {name: block.scalar(name) for name in block.scalar_names}
        events = [e for guard in self._guards for e in guard.events(block.steps, scalars)]
        if events:
            self._writer.write_events(events)
        assert self._diagnosis is not None
        self._diagnosis(dataclasses.replace(block, events=tuple(events)))

    def _publish(self, findings: list[Finding]) -> None:
        """Store new or extended findings, log each cause once, pass them to the sinks."""
        self._writer.write_findings(findings)
        for finding in findings:
            if (finding.kind, finding.layer) not in self._announced:
                self._announced.add((finding.kind, finding.layer))
                logger.warning("gradwatch finding: %s", finding)
        for sink in self._sinks:
            sink.write_findings(findings)


def learning_rates(
    optimizer: torch.optim.Optimizer | None, inventory: Inventory
) -> tuple[float | None, ...]:
    """The learning rate of the parameter group holding each watched tensor, None where no group
    does (1.0 for all without an optimizer)."""
    if optimizer is None:
        return (1.0,) * len(inventory.params)
    lr = {
        id(p): float(group["lr"]) if isinstance(group.get("lr"), (int, float)) else 1.0
        for group in optimizer.param_groups
        for p in group["params"]
    }
    return tuple(lr.get(id(p)) for p in inventory.params)
