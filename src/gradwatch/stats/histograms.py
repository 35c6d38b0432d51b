"""Histograms on probe steps: log10|g| per gradient tensor and output values per probed module.

Fixed, documented bins, so that steps, runs and ranks add up and a histogram is stored as counts:

- `grad_hist`  per watched tensor, log10|g| over `GRAD_HIST_EDGES`: bin 0 is [−inf, −45), which
               holds the exact zeros (log10 0 = −inf; no float32/bf16/fp16 value is non-zero below
               1.4e-45), bin 1 is [−45, −24) (tiny but not zero), then 4 bins per decade from 1e-24
               to 1e4, and [4, inf) for |g| ≥ 1e4. NaN/±Inf entries are not counted here
               (`grad_nonfinite` counts them). Before any guard acts, as the other gradient
               statistics.
- `act_hist`   per probed module, the output values over `ACT_HIST_EDGES`: symmetric and
               log-spaced, 2 bins per decade for 1e-6 ≤ |y| < 1e4 on each side, [−1e-6, 1e-6)
               around 0 (holds a ReLU's zeros) and the two open ends; NaN/±Inf not counted.

Bins are computed, not searched: from v = log10|x| in float32, ⌊4v⌋ (or ⌊2v⌋) is exact, so an
entry lands where `numpy.histogram` of log10|g| (or of y) with these edges puts it, except that
float32's log10 may round an entry lying within ~1e-7 (relative) of an edge across it. Counts are
float64 (exact to 2^53).

Cost, probe steps only: the gradients of a (device, dtype) group are concatenated in chunks of up
to `CHUNK_ELEMENTS` entries (one copy), binned with a few element-wise kernels and counted with
one `index_add_` per tensor; per probed module the same over its output, in the forward hook. On
2 CPU cores about 5-7 ms per million entries. No host sync.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradwatch.stats.device import constant

# log10|g| edges: zeros, tiny, 4 bins per decade over [1e-24, 1e4), large.
GRAD_HIST_EDGES: np.ndarray = np.concatenate(
    [[-np.inf, -45.0], np.arange(-24.0, 4.0 + 0.125, 0.25), [np.inf]]
)
# Output-value edges: ±10^(k/2) for k = −12, ..., 8 (1e-6 to 1e4), and the open ends.
_MAGNITUDES = 10.0 ** (np.arange(-12, 9) / 2)
ACT_HIST_EDGES: np.ndarray = np.concatenate([[-np.inf], -_MAGNITUDES[::-1], _MAGNITUDES, [np.inf]])
HISTOGRAM_EDGES: dict[str, np.ndarray] = {"grad_hist": GRAD_HIST_EDGES, "act_hist": ACT_HIST_EDGES}
# Where the open ends stop when a viewer needs finite edges (TensorBoard, W&B): one bin further.
_FINITE_ENDS = {"grad_hist": (-46.0, 5.0), "act_hist": (-1e5, 1e5)}
# At most this many gradient entries are counted at once (temporaries of 4 and 8 bytes each).
CHUNK_ELEMENTS = 1 << 22


def bins(name: str) -> int:
    return len(HISTOGRAM_EDGES[name]) - 1


def finite_edges(name: str) -> np.ndarray:
    """The edges of histogram `name` with the open ends closed (−inf, inf → `_FINITE_ENDS`),
    for viewers that need finite bins."""
    edges = HISTOGRAM_EDGES[name].copy()
    edges[0], edges[-1] = _FINITE_ENDS[name]
    return edges


# grad_hist is counted over a wide index w = ⌊4·log10|g|⌋ + 200 (exact: 4v and its floor are),
# 0 for zeros, `_NONFINITE` for NaN/±Inf; `_GRAD_BIN` maps each w to its bin (trash: the last).
_NONFINITE = 2000
_WIDE = np.arange(_NONFINITE + 1)
_GRAD_BIN = np.select(
    [_WIDE == _NONFINITE, _WIDE <= 19, _WIDE <= 103, _WIDE <= 215],
    [len(GRAD_HIST_EDGES) - 1, 0, 1, _WIDE - 102],
    default=len(GRAD_HIST_EDGES) - 2,
)


def grad_wide_index(flat: Tensor) -> Tensor:
    """w = ⌊4·log10|g|⌋ + 200 per entry (int64): below 20 for |g| < 1e-45 (zeros), 20-103 for
    [1e-45, 1e-24), 104-215 for the quarter-decades of [1e-24, 1e4), above for larger ones, and
    `_NONFINITE` for NaN/±Inf. Works in place on `flat`, a temporary (a float32 one, or a copy):
    six in-place passes and the conversion."""
    wide = flat.float().abs_().log10_().mul_(4).floor_().add_(200)
    wide.nan_to_num_(nan=_NONFINITE, posinf=_NONFINITE, neginf=0).clamp_(0, _NONFINITE)
    return wide.long()


# act_hist is counted over a wide index too: w = m + 100 for y ≥ 0 and m + 1100 for y < 0, with
# m the half-decade of |y| (below), 0 for zeros, `_NONFINITE` for NaN/±Inf; `_ACT_BIN` maps w to
# its bin: y ≥ 0 → 21 + (clamp(m, −13, 8) + 13), y < 0 → 21 − (clamp(m, −13, 8) + 13). (A float64
# |y| < 1e-50 may land on the other side's range: both put it in the middle bin.)
_NEGATIVE = (_WIDE >= 1000) & (_WIDE < _NONFINITE)
_HALF_DECADE = np.clip(np.where(_NEGATIVE, _WIDE - 1100, _WIDE - 100), -13, 8) + 13
_ACT_BIN = np.where(
    _WIDE == _NONFINITE,
    len(ACT_HIST_EDGES) - 1,
    np.where(_NEGATIVE, 21 - _HALF_DECADE, 21 + _HALF_DECADE),
)
_ACT_BIN[0] = 21  # zeros (and what underflows log10) sit in the middle bin
_TO_BIN = {"grad_hist": tuple(_GRAD_BIN.tolist()), "act_hist": tuple(_ACT_BIN.tolist())}


def act_bins(values: Tensor) -> Tensor:
    """The wide index of each output value (int64); `_ACT_BIN` maps it to the `act_hist` bin.

    With t = 2·log10|y| (float32), the half-decade m = ⌊t⌋ for y ≥ 0 and ⌈t⌉ − 1 for y < 0
    (numpy's bins are closed towards −inf on the negative side too), which is ⌊t⌋ except where t
    is a whole number. No per-element branch: a few in-place passes.
    """
    values = values.float()
    negative = values < 0
    twice = values.abs().log10_().mul_(2)
    wide = twice.floor()
    wide.add_((wide == twice) & negative, alpha=-1)
    wide.add_(100).add_(negative, alpha=1000)
    wide.nan_to_num_(nan=_NONFINITE, posinf=_NONFINITE, neginf=0).clamp_(0, _NONFINITE)
    return wide.long()


def grad_histograms(grads: list[Tensor]) -> Tensor:
    """`grad_hist` counts [len(grads), bins] of one (device, dtype) group, float64: the wide
    index of each chunk in one go, then each tensor's slice (a view) counted on its own."""
    rows = []
    for chunk in _chunks(grads):
        wide = grad_wide_index(torch.cat([g.detach().reshape(-1) for g in chunk]))
        start = 0
        for g in chunk:
            rows.append(_count_wide(wide[start : start + g.numel()]))
            start += g.numel()
    if not rows:
        return torch.zeros(0, bins("grad_hist"), dtype=torch.float64)
    return _collapse(torch.stack(rows), "grad_hist")


def act_histogram(y: Tensor) -> Tensor:
    """`act_hist` counts [bins] of a module output, float64."""
    return _collapse(_count_wide(act_bins(y.detach().reshape(-1)))[None], "act_hist")[0]


def _count_wide(index: Tensor) -> Tensor:
    """How often each wide index occurs: [_NONFINITE + 1] float64, by `index_add_` into a result
    of fixed size. Not `bincount`: on CUDA it reads the largest index back to the host to size
    its output (a sync), and under torch.compile its data-dependent size breaks the graph."""
    counts = torch.zeros(_NONFINITE + 1, dtype=torch.float64, device=index.device)
    ones = torch.ones((), dtype=torch.float64, device=index.device).expand(index.numel())
    return counts.index_add_(0, index, ones)


def _collapse(wide_counts: Tensor, name: str) -> Tensor:
    """Wide-index counts [rows, _NONFINITE + 1] summed into histogram `name`'s bins [rows,
    bins] (the dropped entries' bin left out)."""
    device = wide_counts.device
    to_bin = constant(_TO_BIN[name], device, torch.long)
    counts = torch.zeros(len(wide_counts), bins(name) + 1, dtype=torch.float64, device=device)
    return counts.index_add_(1, to_bin, wide_counts)[:, :-1]


def _chunks(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive runs of tensors of at most CHUNK_ELEMENTS entries (or one larger tensor)."""
    chunks: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if not chunks or size + t.numel() > CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.numel()
    return chunks
