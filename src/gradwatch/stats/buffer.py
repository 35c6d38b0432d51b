"""Device-side block buffer for step statistics, and its asynchronous copy to the host.

The buffer holds `rows` steps of float32 statistics of a fixed trailing shape (tensors x stats,
modules x stats, or scalars). Steps write rows on the device; a flush hands the filled rows to the
host with one copy and resets them to NaN. Device memory: rows x prod(shape) x 4 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class HostCopy:
    """A device-to-host copy in flight; `wait()` blocks until it lands: in the writer thread, or
    in the step path for a copy issued a block earlier (long landed), never for a fresh one."""

    tensor: Tensor
    done: torch.cuda.Event | None

    def wait(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.tensor.numpy()  # host data: the copy on the host


class BlockBuffer:
    """`rows` x `shape` float32 statistics on `device`, NaN where nothing was recorded.

    The last axis of `shape` may grow with `grow()` (new scalar names appear while training).
    """

    def __init__(self, rows: int, shape: tuple[int, ...], device: torch.device) -> None:
        self.data = torch.full((rows, *shape), torch.nan, dtype=torch.float32, device=device)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def grow(self, size: int) -> None:
        """Widen the last axis to at least `size`, keeping what was recorded (rare: allocates)."""
        width = self.data.shape[-1]
        if size <= width:
            return
        wider = torch.full(
            (*self.data.shape[:-1], max(size, 2 * width)),
            torch.nan,
            dtype=self.data.dtype,
            device=self.data.device,
        )
        wider[..., :width] = self.data
        self.data = wider

    def take(
        self,
        n: int,
        width: int | None = None,
        order: Tensor | None = None,
        combine: Callable[[Tensor], Tensor] | None = None,
    ) -> HostCopy:
        """Start copying the first `n` rows to the host, then reset the buffer to NaN.

        `width` keeps that many entries of the last axis; `order` reorders axis 1; `combine`
        turns the block into what is stored (in distributed training: the whole-model statistics
        from this rank's partials) and may work in place. Stream order makes the reset wait for
        the copy; nothing syncs with the host beyond what `combine` does.
        """
        block = self.data[:n] if width is None else self.data[:n, ..., :width]
        if order is not None:
            block = block.index_select(1, order)
        if combine is not None:
            block = combine(block)
        copy = host_copy(block)
        self.data.fill_(torch.nan)
        return copy


def host_copy(tensor: Tensor) -> HostCopy:
    """Start copying `tensor` to the host: asynchronous from CUDA (pinned memory and an event),
    a copy elsewhere, so that later writes to `tensor` do not reach it."""
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return HostCopy(host, done)
    return HostCopy(tensor.detach().clone(), None)


@dataclass(frozen=True, slots=True)
class ProbeArray:
    """Arrays recorded on probe steps only (profiles, histograms): `data` [len(steps), columns,
    width] on the host (float32, or float64 for counts), NaN where nothing was recorded;
    `columns` name axis 1."""

    steps: np.ndarray
    columns: tuple[str, ...]
    data: np.ndarray


class ProbeArrays:
    """Per-probe-step arrays [columns, width] waiting on the device for the next flush.

    Probe steps are few, so each keeps its own tensor (no ring buffer sized for every step);
    `take()` stacks each name's arrays and starts their copy to the host.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, list[tuple[int, Tensor]]] = {}
        self._columns: dict[str, tuple[str, ...]] = {}

    def add(self, name: str, step: int, columns: tuple[str, ...], array: Tensor) -> None:
        self._columns[name] = columns
        self._arrays.setdefault(name, []).append((step, array))

    def take(self) -> dict[str, tuple[list[int], tuple[str, ...], HostCopy]]:
        """The arrays since the last take. Columns may only grow (a module seen for the first
        time): earlier arrays are NaN in the new columns."""
        taken = {
            name: (
                [s for s, _ in rows],
                self._columns[name],
                host_copy(_stack_padded([a for _, a in rows], len(self._columns[name]))),
            )
            for name, rows in self._arrays.items()
        }
        self._arrays.clear()
        return taken


def _stack_padded(arrays: list[Tensor], columns: int) -> Tensor:
    """[len(arrays), columns, ...], NaN where an array has fewer columns."""
    if all(a.shape[0] == columns for a in arrays):
        return torch.stack(arrays)
    out = arrays[-1].new_full((len(arrays), columns, *arrays[-1].shape[1:]), torch.nan)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


@dataclass(frozen=True, slots=True)
class StatsBlock:
    """The statistics of consecutive recorded steps, on the host: what a flush hands on.

    `tensor_data` is [steps, tensors, len(tensor_stats)], `module_data` [steps, modules,
    len(module_stats)] and `scalar_data` [steps, len(scalar_names)]; NaN marks "not recorded".
    `events` are the guards' actions in these steps (`guards.base.Event`), for the detectors.
    """

    steps: np.ndarray
    tensor_stats: tuple[str, ...]
    tensor_data: np.ndarray
    module_stats: tuple[str, ...]
    module_data: np.ndarray
    scalar_names: tuple[str, ...]
    scalar_data: np.ndarray
    arrays: dict[str, ProbeArray] = field(default_factory=dict)
    events: tuple[Any, ...] = ()

    def tensor_series(self, name: str) -> np.ndarray:
        """[steps, tensors] values of one per-tensor statistic."""
        return self.tensor_data[:, :, self.tensor_stats.index(name)]

    def module_series(self, name: str) -> np.ndarray:
        """[steps, modules] values of one per-module statistic."""
        return self.module_data[:, :, self.module_stats.index(name)]

    def scalar(self, name: str) -> np.ndarray:
        """[steps] values of one scalar; NaN everywhere if it was not logged in this block."""
        if name not in self.scalar_names:
            return np.full(len(self.steps), np.nan, dtype=np.float32)
        return self.scalar_data[:, self.scalar_names.index(name)]


@dataclass(frozen=True)
class PendingBlock:
    """A flushed block on its way to the host: the steps, the statistic names and the copies in
    flight. `wait()` (in the writer thread) turns it into a `StatsBlock`."""

    steps: list[int]
    tensor_stats: tuple[str, ...]
    tensor_copy: HostCopy
    module_stats: tuple[str, ...]
    module_copy: HostCopy
    scalar_names: tuple[str, ...]
    scalar_copy: HostCopy
    arrays: dict[str, tuple[list[int], tuple[str, ...], HostCopy]] = field(default_factory=dict)
    # Distributed: the copies cover the buffers' whole capacity (the same shapes on every rank),
    # of which the first len(steps) rows are the block's; `finish_scalars` turns the scalars
    # gathered from every rank into (names, [rows, names]).
    finish_scalars: Callable[[np.ndarray], tuple[tuple[str, ...], np.ndarray]] | None = None

    def wait(self) -> StatsBlock:
        rows = len(self.steps)
        names, scalars = self.scalar_names, self.scalar_copy.wait()
        if self.finish_scalars is not None:
            names, scalars = self.finish_scalars(scalars)
        return StatsBlock(
            steps=np.asarray(self.steps, dtype=np.int64),
            tensor_stats=self.tensor_stats,
            tensor_data=self.tensor_copy.wait()[:rows],
            module_stats=self.module_stats,
            module_data=self.module_copy.wait()[:rows],
            scalar_names=names,
            scalar_data=scalars[:rows],
            arrays={
                name: ProbeArray(np.asarray(steps, dtype=np.int64), columns, copy.wait())
                for name, (steps, columns, copy) in self.arrays.items()
            },
        )
