"""Per-tensor gradient and parameter statistics, computed with foreach kernels on the device.

Every function here works on a list of tensors that share a device and dtype (one `TensorGroup`),
returns a float32 tensor with one value per input tensor on that device, and never syncs with the
host. Statistics are accumulated in float32 whatever the parameter dtype, so bf16 and fp16 norms do
not round away.

The statistics, when they run and what each costs (n = number of gradient or parameter elements).
Only `grad_norm` runs every recorded step: it is the one pass over the gradients every monitor pays,
and a NaN/Inf anywhere in a tensor makes its norm non-finite, so non-finite gradients show every
step. The rest wait for probe steps (each further pass costs about 3% of an MLP step on 2 cores).

- `grad_norm`      ‖g‖₂, one pass over the gradients; every recorded step.
- `grad_max`       max |g|, one pass over the gradients; probe steps.
- `grad_nonfinite` count of NaN/±Inf entries in g; one pass and a temporary of size n: probe steps.
- `param_norm`     ‖θ‖₂ before the optimizer's update: probe steps only, read from the snapshot.
- `update_ratio`   ‖θ_after − θ_before‖₂ / ‖θ_before‖₂ (NaN where θ_before = 0): probe steps only;
                   the snapshot is a copy of the parameters held from the step pre-hook to the
                   post-hook (one copy, two passes).
- `grad_hist`      a histogram of log10|g| per tensor (`histograms.py`); probe steps.
- `pe_norm_p50`, `pe_norm_p95`, `pe_norm_max`  the median, 95th percentile and largest of the
                   tensor's per-example gradient norms (`per_example.py`); probe steps, with
                   `gw.watch(..., per_example=True)` only.
- `adam_eps_frac`  share of entries where Adam's ε dominates its denominator
                   (`optimizer_state.py`); probe steps, Adam-family optimizers only.
- `grad_none`      1 where `.grad` was None when the step's statistics were read, 0 where it was a
                   tensor; every recorded step. Known on the host (no pass, no sync): an absent
                   gradient is not a non-finite one, and its grad statistics stay NaN.
- `stale_norm`     ‖the part of the step's gradient that was already in `.grad` before the step's
                   first backward‖ (`stale.py`): 0 when the gradients were zeroed (or set to None)
                   since the last step; probe steps, one tensor hook per parameter.
- `row_spread`     ‖W − mean_rows(W)‖₂ / ‖W‖₂ over the first `SAMPLED_ROWS` rows of a weight
                   (axis 0: the units it feeds; the other axes flattened): 0 when those units
                   have the same weights, as after a constant init (which makes every row equal;
                   a random init makes none). Probe steps, tensors of 2+ dimensions with 2+ rows
                   (NaN for others, and under FSDP2, which shards the rows); reads 16 rows, not
                   the weight (a whole-weight spread cost +0.25x a plain step per probe step on
                   the 1024-wide MLP benchmark).

Under FSDP2 every pass runs on this rank's shard (`local_tensor`), and a buffer row holds the
shard's partials until the flush combines them (`combine_shards`): norms as themselves, maxima,
counts, shares of the whole tensor, and in the `update_ratio` column ‖Δθ_r‖ instead of the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradwatch.distributed import Reduction, local_tensor
from gradwatch.inventory import Inventory
from gradwatch.stats.device import constant
from gradwatch.stats.histograms import bins, grad_histograms

TENSOR_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_max",
    "grad_nonfinite",
    "param_norm",
    "update_ratio",
    "pe_norm_p50",
    "pe_norm_p95",
    "pe_norm_max",
    "adam_eps_frac",
    "grad_none",
    "stale_norm",
    "row_spread",
)
# row_spread reads this many rows of a weight (see the module docstring).
SAMPLED_ROWS = 16
(
    GRAD_NORM,
    GRAD_MAX,
    GRAD_NONFINITE,
    PARAM_NORM,
    UPDATE_RATIO,
    PE_NORM_P50,
    PE_NORM_P95,
    PE_NORM_MAX,
    ADAM_EPS_FRAC,
    GRAD_NONE,
    STALE_NORM,
    ROW_SPREAD,
) = range(len(TENSOR_STATS))


def l2_norms(tensors: list[Tensor]) -> Tensor:
    """‖t‖₂ of each tensor, accumulated in float32; one fused kernel per group on CUDA."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def max_abs(tensors: list[Tensor]) -> Tensor:
    """max |t| of each tensor; NaN if the tensor holds a NaN, inf if it holds ±inf.

    On CUDA the foreach inf-norm is one fused kernel. On CPU that kernel is a slow generic loop
    (about 20x a 2-norm here), while `aminmax` runs at memory speed, so CPU uses max(max t, −min t).
    """
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float32))
    # An empty shard (FSDP2 shards unevenly) has no entries: its max is 0.
    tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]
    lows, highs = zip(*(torch.aminmax(t) for t in tensors), strict=True)
    return torch.maximum(torch.stack(highs), torch.stack(lows).neg()).float()


def nonfinite_counts(tensors: list[Tensor], norms: Tensor) -> Tensor:
    """Number of NaN or ±Inf entries of each tensor, given their 2-norms.

    t·0 is 0 for every finite entry and NaN for the rest, and the 0-"norm" counts non-zero entries,
    so the count needs no boolean temporaries (which are slower than this on CPU). A tensor with a
    finite norm has no such entry: on the CPU, where reading the norms costs no sync, only the
    others are counted (the product copies every gradient: 5 of the MLP probe step's 14 extra
    ms); on an accelerator every tensor is, without a sync.
    """
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(torch._foreach_mul(tensors, 0.0), 0)).float()
    counts = torch.zeros(len(tensors))  # host data: this path runs on CPU tensors only
    # host data: the norms of CPU tensors
    for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
        counts[i] = torch.linalg.vector_norm(tensors[i] * 0.0, 0)
    return counts


def row_spreads(tensors: list[Tensor]) -> Tensor:
    """‖W − mean_rows(W)‖ / ‖W‖ over the first SAMPLED_ROWS rows of each tensor (rows along
    axis 0, other axes flattened); NaN for tensors with fewer than 2 dimensions or rows, and
    where those rows are all zero."""
    spreads = []
    for t in tensors:
        if t.dim() < 2 or t.shape[0] < 2:
            spreads.append(t.new_full((), torch.nan, dtype=torch.float32))
            continue
        rows = t.detach()[:SAMPLED_ROWS].flatten(1).float()
        norm = torch.linalg.vector_norm(rows)
        spread = torch.linalg.vector_norm(rows - rows.mean(dim=0))
        spreads.append(torch.where(norm > 0, spread / norm, torch.nan))
    return torch.stack(spreads)


@dataclass(frozen=True)
class PresentGroup:
    """Watched parameters of one (device, dtype) group that have a gradient at this step."""

    index: tuple[int, ...]
    params: list[nn.Parameter]
    grads: list[Tensor]


class GradStatistics:
    """Writes the per-tensor statistics of one step into a row of the statistics buffer.

    A row is a float32 tensor [tensors, len(TENSOR_STATS)] on the inventory's device, NaN where a
    statistic was not computed. Parameters whose `.grad` is None at a step keep NaN grad statistics.
    With `sharded` (FSDP2) the row holds this rank's partials, see the module docstring.
    No method syncs with the host.
    """

    def __init__(self, inventory: Inventory, sharded: bool = False) -> None:
        self.inventory = inventory
        self.sharded = sharded
        self._absent: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._snapshots: list[list[Tensor]] = []

    def present(self) -> list[PresentGroup]:
        """The watched parameters that have a gradient now, per (device, dtype) group."""
        groups = []
        for group in self.inventory.groups:
            members = [
                (i, p) for i, p in zip(group.index, group.params, strict=True) if p.grad is not None
            ]
            if members:
                index, params = zip(*members, strict=True)
                grads = [p.grad for p in params]
                if self.sharded:
                    params = self._params(params)
                    grads = [local_tensor(g) for g in grads]
                groups.append(PresentGroup(index, list(params), grads))
        return groups

    def record_grads(
        self, present: list[PresentGroup], row: Tensor | None, *, probe: bool, device: torch.device
    ) -> Tensor:
        """Fill `grad_norm` (and on probe steps `grad_max`, `grad_nonfinite`) in `row`, if given;
        return the global L2 norm on `device`.

        The global norm is sqrt(Σ ‖g_i‖²) over the gradients present: the value `clip_grad_norm_`
        computes, taken before any guard acts. It is 0 when no parameter has a gradient. Sharded,
        it is this rank's part (see `global_norm`).
        """
        partials = []
        for group in present:
            norms = l2_norms(group.grads)
            partials.append(torch.linalg.vector_norm(norms).to(device, non_blocking=True))
            if row is None:
                continue
            columns = [norms]
            if probe:
                columns += [max_abs(group.grads), nonfinite_counts(group.grads, norms)]
            values = torch.stack(columns, dim=1).to(row.device, non_blocking=True)
            index = constant(group.index, row.device, torch.long)
            row[:, GRAD_NORM : GRAD_NORM + len(columns)].index_copy_(0, index, values)
            if probe and not self.sharded:
                spreads = row_spreads(self._params(group.params)).to(row.device)
                row[:, ROW_SPREAD].index_copy_(0, index, spreads)
        if row is not None:
            self._mark_absent(present, row)
        if not partials:
            return torch.zeros((), device=device)
        return (
            partials[0] if len(partials) == 1 else torch.linalg.vector_norm(torch.stack(partials))
        )

    def _mark_absent(self, present: list[PresentGroup], row: Tensor) -> None:
        """`grad_none`: 0 for the tensors with a gradient, 1 for the others (from the host's
        view of `.grad`, so no pass over data and no sync)."""
        row[:, GRAD_NONE].zero_()
        have = tuple(i for group in present for i in group.index)
        absent = self._absent.get(have)
        if absent is None:  # the same parameters lack a gradient step after step: cache
            kept = set(have)
            absent = tuple(i for i in range(len(self.inventory.tensors)) if i not in kept)
            self._absent = {have: absent}
        if absent:
            row[:, GRAD_NONE].index_fill_(0, constant(absent, row.device, torch.long), 1.0)

    def histograms(self, present: list[PresentGroup], device: torch.device) -> Tensor:
        """`grad_hist` counts [tensors, bins] on `device` (see `histograms.py`), float64; NaN rows
        for tensors without a gradient. Sharded, this rank's shards' counts (summed over the
        shard group by the caller). Probe steps; no host sync."""
        shape = (len(self.inventory.tensors), bins("grad_hist"))
        counts = torch.full(shape, torch.nan, dtype=torch.float64, device=device)
        for group in present:
            values = grad_histograms(group.grads).to(device, non_blocking=True)
            counts.index_copy_(0, constant(group.index, device, torch.long), values)
        return counts

    def snapshot_params(self) -> list[list[Tensor]]:
        """Copies of the watched parameters, one list per group: θ_before of this update, in
        buffers kept from one probe step to the next (on the CPU a fresh allocation of them
        cost 2.5x the copy: 5 of the MLP probe step's 14 extra ms)."""
        params = [self._params(g.params) for g in self.inventory.groups]
        shapes = [[p.shape for p in group] for group in params]
        if [[b.shape for b in group] for group in self._snapshots] != shapes:
            self._snapshots = [[torch.empty_like(p) for p in group] for group in params]
        for buffers, group in zip(self._snapshots, params, strict=True):
            torch._foreach_copy_(buffers, group)
        return self._snapshots

    def record_update(self, row: Tensor, snapshot: list[list[Tensor]]) -> None:
        """Fill `param_norm` (‖θ_before‖) and `update_ratio` (‖θ_after − θ_before‖ / ‖θ_before‖).

        Consumes `snapshot`: its tensors are overwritten with θ_before − θ_after.
        """
        for group, before in zip(self.inventory.groups, snapshot, strict=True):
            before_norms = l2_norms(before)
            torch._foreach_sub_(before, self._params(group.params))
            if self.sharded:  # the ratio needs the whole tensor's norms: combined at flush
                ratios = l2_norms(before)
            else:
                # A parameter that is all zeros (a fresh bias) has no relative update: NaN, not inf.
                ratios = torch.where(before_norms > 0, l2_norms(before) / before_norms, torch.nan)
            values = torch.stack([before_norms, ratios], dim=1).to(row.device, non_blocking=True)
            row[:, PARAM_NORM : UPDATE_RATIO + 1].index_copy_(
                0, constant(group.index, row.device, torch.long), values
            )

    def _params(self, params: tuple[nn.Parameter, ...]) -> list[Tensor]:
        if self.sharded:
            return [local_tensor(p.detach()) for p in params]
        return [p.detach() for p in params]


def global_norm(partial: Tensor, shards: Reduction) -> Tensor:
    """The whole model's gradient norm from this rank's part: √Σ_r ‖g_r‖² over the shard group
    (one all-reduce under FSDP2; the part itself otherwise)."""
    if not shards.active:
        return partial
    return shards.sum(partial.double().square()).sqrt().float()


def combine_shards(data: Tensor, shards: Reduction) -> Tensor:
    """Turn a block of per-shard partial rows [steps, tensors, stats] into whole-tensor
    statistics, in place: one f64 SUM all-reduce (squared norms, counts) and one MAX all-reduce.

    Norms are squared in float64, so norms up to 1e154 combine without overflow. A NaN marks a
    statistic not recorded at a step (the same on every rank) and stays NaN; a shard whose max is
    NaN (it holds a NaN) makes the combined max +inf (the non-finite count tells how many).
    """
    # Index tensors made once (a Python list as an index is copied to the device at each use).
    summed = (GRAD_NORM, GRAD_NONFINITE, PARAM_NORM, UPDATE_RATIO, ADAM_EPS_FRAC)
    norms = data.index_select(2, constant(summed, data.device, torch.long)).double()
    squared = constant((0, 2, 3), data.device, torch.long)
    norms.index_copy_(2, squared, norms.index_select(2, squared).square())
    shards.sum(norms)
    grad_norm, counts = norms[:, :, 0].sqrt(), norms[:, :, 1]
    data[:, :, ADAM_EPS_FRAC] = norms[:, :, 4].float()
    param_norm, update_norm = norms[:, :, 2].sqrt(), norms[:, :, 3].sqrt()
    ratios = torch.where(param_norm > 0, update_norm / param_norm, torch.nan)
    largest = data[:, :, GRAD_MAX]
    recorded = ~torch.isnan(largest)
    maxima = shards.max(torch.where(recorded, largest.nan_to_num(torch.inf), -torch.inf))
    data[:, :, GRAD_MAX] = torch.where(maxima == -torch.inf, torch.nan, maxima)
    data[:, :, GRAD_NORM] = grad_norm.float()
    data[:, :, GRAD_NONFINITE] = counts.float()
    data[:, :, PARAM_NORM] = param_norm.float()
    data[:, :, UPDATE_RATIO] = ratios.float()
    return data
