"""Walking the nested structures that models take and return (tuples, lists, dicts, objects
holding tensors, such as a Hugging Face cache): find their floating tensors, map a function over
them, and snapshot them detached so that a forward that appends to one cannot change the copy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


def floating_tensors(obj: Any) -> Iterator[Tensor]:
    """The floating-point tensors in a (nested) output or argument structure, in order."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from floating_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from floating_tensors(value)


def map_floating(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Rebuild a (nested) structure with `fn` applied to each floating-point tensor."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return type(obj)({k: map_floating(v, fn) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_floating(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_floating(v, fn) for v in obj)
    return obj


SHARED = (str, bytes, int, float, complex, bool, torch.dtype, torch.device, type, nn.Module)


def snapshot(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """A copy of an argument structure with every tensor detached and cloned, also inside other
    objects (a KV cache); modules, functions and immutable values are shared, not copied."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, Tensor):
        copied = obj.detach().clone()
    elif obj is None or isinstance(obj, SHARED) or callable(obj):
        return obj
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        copied = type(obj)(*(snapshot(v, memo) for v in obj))
    elif isinstance(obj, (list, tuple)):
        copied = type(obj)(snapshot(v, memo) for v in obj)
    elif isinstance(obj, dict):
        copied = copy.copy(obj)
        for key, value in obj.items():
            copied[key] = snapshot(value, memo)
    else:
        try:
            copied = copy.copy(obj)
            for key, value in vars(obj).items():
                setattr(copied, key, snapshot(value, memo))
        except (TypeError, AttributeError, copy.Error):
            return obj  # an object that cannot be copied is shared as it is
    memo[id(obj)] = copied
    return copied


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy; tensors with a graph kept in a module's attributes (from an earlier forward)
    are copied detached, since deepcopy cannot copy them."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            for t in tensors_in(value):
                if t.grad_fn is not None:
                    memo[id(t)] = t.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise TypeError(
            f"gradcheck works on a deep copy of the model (so yours stays as it is) and could not "
            f"copy this {type(model).__name__}: {exc}"
        ) from exc


def tensors_in(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth + 1)
