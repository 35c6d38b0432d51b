"""`RecordedBlock`: the steps recorded since the last flush, as rows of device buffers, and their
hand-over to the run store's writer (`PendingBlock`), combined over the ranks under
torch.distributed.

Each recorded step takes one row of three buffers: tensor statistics [tensors, TENSOR_STATS],
module statistics [modules, MODULE_STATS] and scalars [names]. A flush starts the copy of the
filled rows to the host and hands them to the writer thread; nothing here waits for the device.
Under torch.distributed every rank flushes at the same steps, so the collectives line up: they
cover the buffers' whole capacity (the same shapes on every rank), the scalars are gathered with
their names, and each rank's (rows, first step) is checked one flush later.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwatch.distributed import (
    GATHERED_SCALARS,
    Topology,
    check_flushed_alike,
    combine_gathered_scalars,
    encode_names,
    flush_header,
    process_group_alive,
)
from gradwatch.inventory import Inventory
from gradwatch.stats.buffer import BlockBuffer, HostCopy, PendingBlock, host_copy
from gradwatch.stats.device import to_device
from gradwatch.stats.flow import MODULE_STATS, combine_flags
from gradwatch.stats.grads import TENSOR_STATS, combine_shards

# The scalar every recorded step has: √Σ‖g‖² before any guard.
GLOBAL_GRAD_NORM = "global_grad_norm"


class RecordedBlock:
    """The buffer rows of the steps recorded since the last flush (`flush_every` at most)."""

    def __init__(
        self, inventory: Inventory, modules: int, rows: int, topology: Topology, device: Any
    ) -> None:
        """`modules`: probed modules; `device`: where collectives run (`collective_device`)."""
        self._topology = topology
        self._collective_device = device
        self.tensor_rows = BlockBuffer(
            rows, (len(inventory.tensors), len(TENSOR_STATS)), inventory.device
        )
        self.module_rows = BlockBuffer(rows, (modules, len(MODULE_STATS)), inventory.device)
        self.scalar_rows = BlockBuffer(rows, (8,), inventory.device)
        self.scalar_names: list[str] = [GLOBAL_GRAD_NORM]
        self.steps: list[int] = []  # the step of each filled row, host side
        # Distributed: the last flush's gathered (rows, first step) with this rank's, checked at
        # the next flush; the scalar names as bytes on the device.
        self._last_flush: tuple[HostCopy, int, int] | None = None
        self._names_on_device: tuple[tuple[str, ...], Tensor] | None = None

    @property
    def full(self) -> bool:
        return len(self.steps) == self.tensor_rows.rows

    def row_of(self, step: int) -> int | None:
        """The row of `step` if it is the latest recorded step, else None."""
        return len(self.steps) - 1 if self.steps and self.steps[-1] == step else None

    def open_row(self, step: int) -> int:
        """The row of `step`: the latest one, or a new one (the block must not be full)."""
        row = self.row_of(step)
        if row is None:
            self.steps.append(step)
            row = len(self.steps) - 1
        return row

    def drop_step(self, step: int) -> None:
        """Forget `step`'s row if it is the latest (half written when gradwatch failed)."""
        if self.row_of(step) is not None:
            self.steps.pop()

    def record_scalar(self, row: int | None, name: str, value: Tensor | float) -> None:
        """Store a scalar of the step in row `row` (dropped when the step is not recorded). A
        tensor stays on the device: no host sync."""
        if row is None:
            return
        column = self._scalar_column(name)  # first: a new name may reallocate the buffer
        cell = self.scalar_rows.data[row, column]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"{name} must be a scalar or a one-element tensor, "
                    f"got a tensor of shape {tuple(value.shape)}"
                )
            cell.copy_(value.detach().reshape(()), non_blocking=True)
        else:
            cell.fill_(float(value))

    def _scalar_column(self, name: str) -> int:
        if name not in self.scalar_names:
            self.scalar_names.append(name)
            self.scalar_rows.grow(len(self.scalar_names))
            if self._topology.distributed and len(self.scalar_names) == GATHERED_SCALARS + 1:
                warnings.warn(
                    f"gradwatch combines at most {GATHERED_SCALARS} scalar names over the ranks; "
                    f"{name!r} and later ones are not stored",
                    stacklevel=4,
                )
        return self.scalar_names.index(name)

    def take(self, module_order: Tensor, probe_arrays: Any) -> PendingBlock | None:
        """The filled rows as a `PendingBlock` for the writer (its copies to the host started),
        the modules in `module_order`; None when no step was recorded. The block is empty
        afterwards."""
        n = len(self.steps)
        if n == 0:
            return None
        names = tuple(self.scalar_names)
        rows, combine_tensors, combine_modules = n, None, None
        gather_scalars: Callable[[Tensor], Tensor] | None = None
        finish_scalars: Callable[[Any], Any] | None = None
        topo = self._topology
        if topo.distributed:  # every rank flushes at the same steps: the collectives line up
            if not process_group_alive():
                raise RuntimeError(
                    f"the process group was destroyed before this watcher was closed: the last "
                    f"{n} recorded steps cannot be combined across ranks and are lost. Close the "
                    "watcher (leave its `with` block) before "
                    "torch.distributed.destroy_process_group()"
                )
            self.check_last_flush()
            header = flush_header(n, self.steps[0], self._collective_device)
            self._last_flush = (host_copy(topo.ranks.gather(header)), n, self.steps[0])
            rows = self.tensor_rows.rows  # the whole capacity: the same shapes on every rank
            if topo.sharded:
                combine_tensors = lambda block: combine_shards(block, topo.shards)  # noqa: E731
            combine_modules = lambda block: combine_flags(block, topo.ranks, topo.rank)  # noqa: E731
            gather_scalars = self._gather_scalars
            gathered_names = host_copy(topo.ranks.gather(self._encoded_names(names)))
            finish_scalars = lambda values: combine_gathered_scalars(  # noqa: E731
                values, gathered_names.wait(), names, {GLOBAL_GRAD_NORM}, topo.sharded
            )
        block = PendingBlock(
            list(self.steps),
            TENSOR_STATS,
            self.tensor_rows.take(rows, combine=combine_tensors),
            MODULE_STATS,
            self.module_rows.take(rows, order=module_order, combine=combine_modules),
            names,
            self.scalar_rows.take(rows, width=len(names), combine=gather_scalars),
            probe_arrays,
            finish_scalars,
        )
        self.steps.clear()
        return block

    def check_last_flush(self) -> None:
        """Under torch.distributed: raise on every rank alike if the ranks' previous flushes
        covered different steps. Its gathered header was copied to the host a block ago, so
        reading it waits for nothing (at close(): for the last flush's copy)."""
        if self._last_flush is None:
            return
        headers, rows, first_step = self._last_flush
        self._last_flush = None
        check_flushed_alike(headers.wait(), rows, first_step)

    def _gather_scalars(self, block: Tensor) -> Tensor:
        """[world, rows, GATHERED_SCALARS]: this block's scalars [rows, names] from every rank,
        each padded to the same width."""
        padded = block.new_full((block.shape[0], GATHERED_SCALARS), torch.nan)
        width = min(block.shape[1], GATHERED_SCALARS)
        padded[:, :width] = block[:, :width]
        return self._topology.ranks.gather(padded)

    def _encoded_names(self, names: tuple[str, ...]) -> Tensor:
        """The scalar names as bytes on the device (`encode_names`), made again only when they
        change: an asynchronous copy, no host sync."""
        if self._names_on_device is None or self._names_on_device[0] != names:
            raw = torch.frombuffer(bytearray(encode_names(names)), dtype=torch.uint8)
            self._names_on_device = (names, to_device(raw, self.scalar_rows.data.device))
        return self._names_on_device[1]
