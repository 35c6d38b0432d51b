"""Module probes: the backpropagated signal, activation health and where non-finite values start.

Which modules are probed: those that own parameters directly (Linear, Conv, norms, attention, ...),
activation modules (ReLU, GELU, Sigmoid, ...) and custom leaf modules (user code with no children,
where a log, a division or an exp can make the first NaN), in the order of their first forward
call. Residual blocks are not probed as such: their inner layers are.

Per-module statistics and when they run (y = the module's output, units = the last axis, or the
channel axis for outputs of 4 or more dimensions):

- `act_nonfinite`  1 if y held a NaN/±Inf at this step, else 0. Every recorded step on modules
                   with parameters and custom modules (one `sum` over y each: a NaN/Inf anywhere
                   makes the sum non-finite); on probe steps also on torch.nn activations, which
                   cannot turn finite inputs into NaN/Inf, so skipping them every step loses no
                   origin and halves the cost on conv nets.
- `signal_norm`    ‖∂L/∂y‖₂, the backpropagated signal at the module's output, from a tensor hook
                   on y (not a full backward hook, which breaks on in-place activations).
                   Probe steps.
- `act_mean`, `act_std`  mean and standard deviation of y. Probe steps.
- `dead_frac`      share of units whose output is 0 for every example of the batch. Probe steps.
- `saturated_frac` share of outputs within 1% (of the output range) of a bound, for bounded
                   activations (sigmoid, tanh, hardtanh, hardsigmoid, softsign); NaN for others.
                   Probe steps.
- `act_hist`       a histogram of the output values (`histograms.py`), returned by `write` on
                   probe steps and stored as an array, not in the statistics row.
- `nonfinite_rank` the lowest rank whose output held NaN/±Inf (0 in a single process); NaN when
                   no rank's did. With `act_nonfinite`.
- `norm_values`    for BatchNorm layers in training mode, the number of values each channel's
                   batch statistics were computed from (batch x spatial positions, this rank's;
                   the fewest over the step's calls); NaN for other modules. Probe steps; read
                   from the input's shape on the host, so it costs no pass and no sync.
- `time_first_to_last`, `time_decay`, `time_reach`  recurrent modules only, probe steps: how far
                   back in time the gradient reaches, see `through_time.py`.

A step's statistics describe every forward pass of that step (gradient accumulation pools its
micro-batches) and, in data-parallel training, the global batch: the hooks add summable partials
(moments, squared signal norms, per-unit firing counts) into preallocated tensors, and `write`
combines them over ranks with one all-reduce per probe step. With the loss the ranks optimise
together, the mean of their losses, ∂L/∂y_r = ∂loss_r/∂y_r / W, so signal_norm = √Σ_r‖∂loss_r/∂y_r‖²
/ W. Holding the state in tensors (no dicts that grow) also keeps `torch.compile` from recompiling
the hooks: one graph per value of `mode`.

Nothing here syncs with the host: values stay device tensors until the step's row is written.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.distributed import LOCAL, Reduction, lowest_rank, module_class, rank_code
from gradwatch.stats.device import to_device
from gradwatch.stats.histograms import act_histogram, bins
from gradwatch.stats.hooks import Shield, eager_unless_traced, unshielded
from gradwatch.stats.module_outputs import (
    ZEROING_ACTIVATIONS,
    activation_moments,
    fired_units,
    first_tensor,
    is_builtin,
    is_custom_leaf,
    owns_parameters,
    probed_modules,
    saturation_bounds,
)
from gradwatch.stats.through_time import TIME_STATS

MODULE_STATS: tuple[str, ...] = (
    "signal_norm",
    "act_mean",
    "act_std",
    "dead_frac",
    "saturated_frac",
    "act_nonfinite",
    "nonfinite_rank",
    "norm_values",
    *TIME_STATS,
)
(
    SIGNAL_NORM,
    ACT_MEAN,
    ACT_STD,
    DEAD_FRAC,
    SATURATED_FRAC,
    ACT_NONFINITE,
    NONFINITE_RANK,
    NORM_VALUES,
) = range(len(MODULE_STATS) - len(TIME_STATS))
# The summable moments of one output (see `activation_moments`).
_N, _SUM, _SUM_MEAN_SQ, _SPREAD, _SATURATED = range(5)


class ProbeMode(enum.IntEnum):
    """What the forward pass in progress belongs to (`ModuleProbes.mode`)."""

    IDLE = 0  # a step that is not recorded
    RECORD = 1  # a recorded step: non-finite flags only
    PROBE = 2  # a probe step: every module statistic


class ModuleProbes:
    """Forward hooks on the probed modules that collect one step's module statistics.

    `mode` (a `ProbeMode`) tells the hooks what the forward pass in progress belongs to: a step
    that is not recorded, a recorded step (non-finite flags only), or a probe step (everything); the
    watcher sets it whenever its step counter moves. Passes under `torch.no_grad()` (evaluation)
    are ignored. `write(row, probe)` turns what was collected into a buffer row [modules,
    len(MODULE_STATS)] and starts afresh; on a probe step it issues one all-reduce over `ranks`.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        ranks: Reduction = LOCAL,
        rank: int = 0,
        world_size: int = 1,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self.shield = shield
        self.names: list[str] = []
        self.types: list[str] = []
        self._modules: list[nn.Module] = []
        self._bounds: list[tuple[float, float] | None] = []
        for name, module in probed_modules(model):
            self.names.append(name)
            self.types.append(module_class(module).__name__)
            self._modules.append(module)
            self._bounds.append(saturation_bounds(module))
        self.device = device
        self.ranks, self.rank, self.world_size = ranks, rank, world_size
        # The modules whose outputs are flagged every recorded step (see `act_nonfinite`).
        self._flagged_every_step = [owns_parameters(m) or is_custom_leaf(m) for m in self._modules]
        self.forward_order: list[int] = []  # columns in the order of their first forward call
        self._seen: set[int] = set()
        self.mode = ProbeMode.IDLE
        self.histograms = False  # whether this probe step counts `act_hist`
        width = len(self._modules)
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self._sums = torch.zeros(width, device=device)  # Σ sum(y): non-finite if y was
        self._calls = torch.zeros(width, device=device)
        self._moments = torch.zeros(width, 5, dtype=wide, device=device)
        self._signal = torch.zeros(width, 2, device=device)  # Σ‖∂L/∂y‖², backward passes
        self._fired: dict[int, Tensor] = {}  # per unit: in how many forward calls it fired
        self._output_dtypes: dict[int, str] = {}  # as first seen on a probe step
        self._norm_values: dict[int, int] = {}  # BatchNorm columns -> values per channel
        self._act_hist = torch.zeros(width, bins("act_hist"), dtype=wide, device=device)
        self._signal_hooks = [shield(self._signal_hook(c)) for c in range(width)]
        self._unsupported: set[int] = set()
        self._segments: tuple[tuple[int, ...], Tensor, Tensor, Tensor] | None = None
        self.handles: list[Any] = []

    def attach(self) -> None:
        for column, module in enumerate(self._modules):
            self.handles.append(module.register_forward_hook(self.shield(self._hook(column))))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._reset(probe=True)

    def zeroing(self, column: int) -> bool:
        return isinstance(self._modules[column], ZEROING_ACTIVATIONS)

    def saturating(self, column: int) -> bool:
        return self._bounds[column] is not None

    def builtin(self, column: int) -> bool:
        """Whether the module is one of torch.nn's own layers (not a user's custom module)."""
        return is_builtin(self._modules[column])

    def owns_parameters(self, column: int) -> bool:
        return owns_parameters(self._modules[column])

    def output_dtype(self, column: int) -> str:
        """The dtype of the module's output on the first probe step ("" before one)."""
        return self._output_dtypes.get(column, "")

    def _hook(self, column: int) -> Callable[[nn.Module, Any, Any], None]:
        flagged_every_step = self._flagged_every_step[column]
        bounds = self._bounds[column]

        @eager_unless_traced
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if column not in self._seen:
                self._seen.add(column)
                self.forward_order.append(column)
            mode = self.mode
            if mode == ProbeMode.IDLE or (mode == ProbeMode.RECORD and not flagged_every_step):
                return
            y = first_tensor(output)
            if y is None or not y.is_floating_point():
                self._warn_unsupported(column, output)
                return
            total = torch.sum(y.detach(), dtype=torch.float32).to(self.device)
            self._sums.select(0, column).add_(total)
            self._calls.select(0, column).add_(1)
            if mode == ProbeMode.PROBE:
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    self._count_norm_values(column, args)
                if column not in self._output_dtypes:
                    self._output_dtypes[column] = str(y.dtype).removeprefix("torch.")
                moments = activation_moments(y, bounds).to(self._moments)
                self._moments.select(0, column).add_(moments)
                if self.histograms:
                    self._act_hist.select(0, column).add_(act_histogram(y).to(self._act_hist))
                fired = fired_units(y)
                if fired is not None:
                    fired = fired.to(self.device)
                    if column not in self._fired:
                        self._fired[column] = torch.zeros_like(fired)
                    self._fired[column].add_(fired)
                if y.requires_grad:
                    y.register_hook(self._signal_hooks[column])

        return hook

    def _count_norm_values(self, column: int, args: Any) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is not None and x.dim() >= 2 and x.shape[1] > 0:
            values = x.numel() // x.shape[1]
            self._norm_values[column] = min(values, self._norm_values.get(column, values))

    def _signal_hook(self, column: int) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            squared = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            self._signal.select(0, column).add_(
                torch.stack([squared, torch.ones_like(squared)]).to(self.device)
            )

        return record

    def write(self, row: Tensor, probe: bool) -> Tensor | None:
        """Turn the collected statistics into `row` and clear them. No host sync; on a probe step
        one all-reduce over the ranks (all ranks call this at the same steps), and the return is
        the step's `act_hist` counts [modules, bins] (NaN rows for modules not called)."""
        called = self._calls > 0
        flags = torch.isfinite(self._sums).logical_not().float()
        row[:, ACT_NONFINITE] = torch.where(called, flags, torch.nan)
        row[:, NONFINITE_RANK] = torch.where(called & (flags > 0), float(self.rank), torch.nan)
        histograms = self._write_probe(row) if probe else None
        self._reset(probe)
        return histograms

    def _write_probe(self, row: Tensor) -> Tensor:
        columns = tuple(sorted(self._fired))
        wide = self._moments.dtype
        packed = torch.cat(
            [self._moments.flatten(), self._signal.to(wide).flatten(), self._act_hist.flatten()]
            + [self._fired[c].to(wide) for c in columns]
        )
        self.ranks.sum(packed)
        width = len(self._modules)
        moments = packed[: 5 * width].view(width, 5)
        signal = packed[5 * width : 7 * width].view(width, 2)
        histogram_end = 7 * width + self._act_hist.numel()
        histograms = packed[7 * width : histogram_end].view_as(self._act_hist)
        n = moments[:, _N]
        mean = moments[:, _SUM] / n
        spread = moments[:, _SPREAD] + (moments[:, _SUM_MEAN_SQ] - moments[:, _SUM] * mean)
        values = torch.stack(
            [
                torch.where(signal[:, 1] > 0, signal[:, 0].sqrt() / self.world_size, torch.nan),
                mean,
                (spread.clamp_min(0) / (n - 1)).sqrt(),
                self._dead_fractions(columns, packed[histogram_end:]),
                moments[:, _SATURATED] / n,
            ],
            dim=1,
        )
        row[:, SIGNAL_NORM : SATURATED_FRAC + 1] = values.to(row)
        for column, count in self._norm_values.items():
            row[column, NORM_VALUES].fill_(float(count))  # a host number: no copy, no sync
        self._norm_values.clear()
        return torch.where((n > 0)[:, None], histograms, torch.nan)

    def _dead_fractions(self, columns: tuple[int, ...], fired: Tensor) -> Tensor:
        """Per module, the share of units that fired in no forward call on any rank."""
        dead = torch.full((len(self._modules),), torch.nan, dtype=fired.dtype, device=fired.device)
        if not columns:
            return dead
        if self._segments is None or self._segments[0] != columns:  # the probed set changed
            sizes = [len(self._fired[c]) for c in columns]
            owner = torch.tensor(columns).repeat_interleave(torch.tensor(sizes))  # host data: lists
            self._segments = (
                columns,
                to_device(columns, fired.device),
                to_device(owner, fired.device),
                to_device(sizes, fired.device, dead.dtype),
            )
        _, index, owner, sizes = self._segments
        counts = torch.zeros_like(dead).index_add_(0, owner, fired.eq(0).to(dead.dtype))
        return dead.index_copy_(0, index, counts[index] / sizes)

    def _reset(self, probe: bool) -> None:
        self._sums.zero_()
        self._calls.zero_()
        if probe:
            self._norm_values.clear()
            self._moments.zero_()
            self._signal.zero_()
            self._act_hist.zero_()
            for fired in self._fired.values():
                fired.zero_()

    def _warn_unsupported(self, column: int, output: Any) -> None:
        if column in self._unsupported:
            return
        self._unsupported.add(column)
        warnings.warn(
            f"gradwatch cannot probe module {self.names[column]!r} "
            f"({self.types[column]}): its output is a {type(output).__name__}, not a floating "
            "tensor; it is left out of the per-module statistics",
            stacklevel=2,
        )


def combine_flags(data: Tensor, ranks: Reduction, rank: int) -> Tensor:
    """Non-finite flags of a flushed block [steps, modules, stats] over all ranks, in place: one
    f64 SUM all-reduce. A module is flagged where any rank flagged it; `nonfinite_rank` is the
    lowest such rank (each rank sends 2^-rank, see `distributed.lowest_rank`)."""
    flags = data[:, :, ACT_NONFINITE].double()
    packed = torch.stack(
        [(~torch.isnan(flags)).double(), torch.where(flags > 0, rank_code(rank), 0.0)]
    )
    ranks.sum(packed)
    data[:, :, ACT_NONFINITE] = torch.where(packed[0] > 0, (packed[1] > 0).float(), torch.nan)
    data[:, :, NONFINITE_RANK] = lowest_rank(packed[1]).float()
    return data
