"""What a probe step records beyond the statistics rows: the histograms, the gradient through
time of recurrent modules, the attention and output-logit statistics, the gradient carried over
from earlier steps, the scale of the input features, and per-example gradient norms with the
noise scale.

The watcher owns one `ProbeRecords`; it tells it which kind of step the next forward pass
belongs to (`set_step`), hands it each probe step's gradients and rows (`record`), and takes its
arrays at each flush (`take`). Each part is described where it is computed:
`stats/histograms.py`, `stats/through_time.py`, `stats/attention.py`, `stats/stale.py`,
`stats/inputs.py`, `stats/per_example.py`, `stats/noise_scale.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradwatch.config import WatchConfig
from gradwatch.distributed import Topology
from gradwatch.inventory import Inventory
from gradwatch.stats.attention import ATTENTION, AttentionProbes
from gradwatch.stats.buffer import HostCopy, ProbeArrays
from gradwatch.stats.example_probes import ExampleProbes
from gradwatch.stats.flow import MODULE_STATS, ModuleProbes, ProbeMode
from gradwatch.stats.grads import (
    GRAD_NORM,
    PE_NORM_MAX,
    PE_NORM_P50,
    STALE_NORM,
    GradStatistics,
    PresentGroup,
)
from gradwatch.stats.hooks import Shield, unshielded
from gradwatch.stats.inputs import InputScale
from gradwatch.stats.noise_scale import PartialGradients
from gradwatch.stats.stale import CarriedGradients
from gradwatch.stats.through_time import TIME_STATS, TimeProbes

GRAD_THROUGH_TIME = "grad_through_time"
Record = Callable[[str, Tensor | float], None]


class ProbeRecords:
    """The histograms, gradients through time and per-example norms of probe steps."""

    def __init__(
        self,
        model: nn.Module,
        inventory: Inventory,
        module_probes: ModuleProbes,
        topology: Topology,
        config: WatchConfig,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self.inventory = inventory
        self.module_probes = module_probes
        self.topology = topology
        device = inventory.device
        self.time_probes = TimeProbes(
            model, device, topology.ranks, topology.world_size, shield=shield
        )
        recurrent = [module_probes.names.index(n) for n in self.time_probes.names]
        self._time_cells = (  # where the through-time summary goes in a module row
            torch.tensor(recurrent, dtype=torch.long, device=device)[:, None],
            torch.tensor([MODULE_STATS.index(n) for n in TIME_STATS], device=device),
        )
        self.attention = AttentionProbes(model, device, topology.ranks, shield=shield)
        self.inputs = InputScale(model, shield=shield)
        # Under FSDP2 `.grad` is a shard that the hooks would see unsharded: left out.
        self.carried = (
            None
            if topology.sharded
            else CarriedGradients(inventory.params, inventory.device, shield=shield)
        )
        self._arrays = ProbeArrays()
        self.examples: ExampleProbes | None = None
        self.parts: PartialGradients | None = None
        self._warned_skipped = False
        if not config.per_example and not topology.sharded:
            self.parts = PartialGradients(
                model, inventory.params, device, topology.ranks, topology.world_size, shield=shield
            )
        if config.per_example:
            reduction = "sum" if config.per_example == "sum" else "mean"
            self.examples = ExampleProbes(
                model, inventory.names, reduction, device, topology, shield=shield
            )
        self._probe = False

    def attach(self) -> None:
        for probes in self._hooked():
            probes.attach()

    def detach(self) -> None:
        for probes in self._hooked():
            probes.detach()
        if self.carried is not None:
            self.carried.disarm()

    def _hooked(
        self,
    ) -> list[TimeProbes | AttentionProbes | InputScale | PartialGradients | ExampleProbes]:
        """The parts that hook the model."""
        parts = [self.time_probes, self.attention, self.inputs, self.parts, self.examples]
        return [p for p in parts if p is not None]

    def end_forward(self) -> None:
        """The step's forward passes and losses are over: its gradients are about to be read."""
        self.attention.leave()

    def set_step(self, probe: bool, histograms: bool) -> None:
        """What the next forward pass belongs to: a probe step, one with histograms."""
        self._probe = probe
        self.module_probes.histograms = histograms
        self.time_probes.probe = probe
        self.attention.probe = probe
        self.inputs.probe = probe
        if self.carried is not None:
            if probe:
                self.carried.arm()
            else:
                self.carried.disarm()
        if self.parts is not None:
            self.parts.next_step(probe)
        if self.examples is not None:
            self.examples.active = probe

    def record(
        self,
        step: int,
        present: list[PresentGroup],
        statistics: GradStatistics,
        act_hist: Tensor,
        rows: tuple[Tensor, Tensor],
        histograms: bool,
        record: Record,
    ) -> None:
        """A probe step's arrays (histograms on histogram steps, the gradient through time) and
        per-example statistics; `rows` are its tensor and module rows, `record(name, value)`
        stores a scalar of the step."""
        tensor_row, module_row = rows
        device = self.inventory.device
        if self.carried is not None:
            tensor_row[:, STALE_NORM] = self.carried.take().to(tensor_row)
        for name, value in self.inputs.take().items():
            record(name, value)
        if histograms:
            grad_hist = self.topology.shards.sum(statistics.histograms(present, device))
            self._arrays.add("grad_hist", step, tuple(self.inventory.names), grad_hist)
            self._arrays.add("act_hist", step, tuple(self.module_probes.names), act_hist)
        if self.time_probes.names:
            profile = self.time_probes.write(module_row, self._time_cells)
            self._arrays.add(GRAD_THROUGH_TIME, step, tuple(self.time_probes.names), profile)
        names, attention, logits = self.attention.write()
        if attention is not None:
            self._arrays.add(ATTENTION, step, tuple(names), attention)
        for name, value in logits.items():
            record(name, value)
        batch_square = torch.nansum(tensor_row[:, GRAD_NORM].double().square())
        if self.parts is not None:
            found = self.parts.record(batch_square)
            if found is not None:
                record("gns_simple", found[0])
                record("gns_batch", found[1])
        if self.examples is not None:
            self._record_examples(tensor_row, batch_square, record)

    def take(self) -> dict[str, tuple[list[int], tuple[str, ...], HostCopy]]:
        """The arrays recorded since the last flush, on their way to the host."""
        return self._arrays.take()

    def _record_examples(self, tensor_row: Tensor, batch_square: Tensor, record: Record) -> None:
        """Per-example norms: quantiles per tensor into the row, the totals' and the noise scale
        as scalars; over the global batch under torch.distributed (`ExampleProbes`)."""
        assert self.examples is not None
        # The fallback re-runs modules: gradwatch's own probes must not record those calls.
        mode, self.module_probes.mode = self.module_probes.mode, ProbeMode.IDLE
        self.time_probes.probe = self.attention.probe = False
        try:
            # under FSDP2 the row holds this rank's shards' norms until the flush: the step
            # gradient's squared norm is their sum over the shard group (one all-reduce)
            whole = self.topology.shards.sum(batch_square.reshape(1).clone()).reshape(())
            found = self.examples.record(whole)
        finally:
            self.module_probes.mode = mode
            self.time_probes.probe = self.attention.probe = self._probe
        if found is None:
            return
        statistics, noise = found
        if statistics.skipped and not self._warned_skipped:
            self._warned_skipped = True
            skipped = statistics.skipped
            reasons = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:3])
            warnings.warn(
                f"gradwatch: per-example norms leave out {len(skipped)} tensor(s), so the "
                f"totals and gns_simple are NaN: {reasons}",
                stacklevel=2,
            )
        tensor_row[:, PE_NORM_P50 : PE_NORM_MAX + 1] = statistics.quantiles().to(tensor_row)
        squares = statistics.totals()
        norms = squares.sqrt()
        scalars = {
            "pe_examples": float(squares.numel()),
            "pe_total_p50": torch.quantile(norms, 0.5),
            "pe_total_max": norms.max(),
            "pe_total_argmax": torch.where(norms.isnan().any(), torch.nan, norms.argmax().float()),
            "pe_top_share": squares.max() / squares.sum(),
            "gns_simple": noise,
            "gns_batch": float(squares.numel()),
        }
        for name, value in scalars.items():
            record(name, value)
