"""Which parameters gradwatch watches, their names, order and (device, dtype) groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One watched parameter tensor: its name from `named_parameters()`, owner module and shape."""

    name: str
    module: str
    shape: tuple[int, ...]
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorGroup:
    """Watched parameters that share a (device, dtype), so that one foreach kernel serves them all.

    `index` holds their positions in the inventory (the columns of the statistics buffer).
    """

    device: torch.device
    dtype: torch.dtype
    params: tuple[nn.Parameter, ...]
    index: tuple[int, ...]


class Inventory:
    """The trainable parameters of a model in model order, grouped by (device, dtype).

    Frozen parameters (`requires_grad=False`) and empty tensors are not watched: they have no
    gradient to read; `skipped` names them, so the run's metadata says what was left out.
    A parameter shared by several modules is watched once, under its first name, as
    `named_parameters()` reports it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params: list[nn.Parameter] = []
        self.tensors: list[TensorInfo] = []
        self.skipped: dict[str, str] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                self.skipped[name] = "frozen"
                continue
            if param.numel() == 0:
                self.skipped[name] = "empty"
                continue
            self.params.append(param)
            self.tensors.append(
                TensorInfo(
                    name=name,
                    module=name.rpartition(".")[0],
                    shape=tuple(param.shape),
                    dtype=str(param.dtype).removeprefix("torch."),
                    numel=param.numel(),
                )
            )
        self.groups = _group_by_device_and_dtype(self.params)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def device(self) -> torch.device:
        """The device the statistics buffer lives on: that of the first watched parameter."""
        return self.params[0].device if self.params else torch.device("cpu")


def _group_by_device_and_dtype(params: list[nn.Parameter]) -> list[TensorGroup]:
    members: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        members.setdefault((p.device, p.dtype), []).append(i)
    return [
        TensorGroup(device, dtype, tuple(params[i] for i in index), tuple(index))
        for (device, dtype), index in members.items()
    ]


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter `optimizer` updates, in the order of its parameter groups."""
    return [p for group in optimizer.param_groups for p in group["params"]]
