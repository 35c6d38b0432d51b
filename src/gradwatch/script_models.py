"""How `gradwatch run` (`launch.py`) finds what a script trains, from the outside: the
parameters a loss reaches, the objects alive in the process, and the module that holds an
optimizer's parameters. Host-side walks; no data is read.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def reached_parameters(loss: torch.Tensor) -> dict[int, torch.Tensor]:
    """The leaf tensors that require grad and that `loss`'s autograd graph reaches (its
    AccumulateGrad nodes), by id. A walk over the graph's nodes on the host: no data, no sync."""
    found: dict[int, torch.Tensor] = {}
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def live(kind: type[Any]) -> list[Any]:
    """Every object of `kind` alive in the process: a walk of the garbage collector's objects,
    once per decision gradwatch run cannot make otherwise. (isinstance on some lazily
    deprecated torch objects warns: not the script's concern.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, kind)]


def holding(params: set[int], modules: Iterable[nn.Module]) -> nn.Module | None:
    """Of `modules`, the one that holds most of `params` (ids), and of those the one with the
    fewest other parameters (the model itself, not a container around it); None when none
    holds any."""
    best, best_key = None, (0, 0)
    for module in modules:
        ids = [id(p) for p in module.parameters()]
        held = sum(i in params for i in ids)
        key = (held, -(len(ids) - held))
        if held and key > best_key:
            best, best_key = module, key
    return best
