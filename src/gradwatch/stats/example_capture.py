"""The hooks behind per-example norms: each call of the modules owning trainable parameters,
with its inputs and where the step's backward puts the signal at its output (`Capture`).

Used by `per_example_grad_norms` and, on probe steps, by `gw.watch(..., per_example=...)`
(`example_probes.py`). `nn.MultiheadAttention` records its inner linear maps itself
(`captured_attention.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.stats.captured_attention import capturable, swap_in, swap_out
from gradwatch.stats.ghost_norms import Call
from gradwatch.stats.hooks import Shield, unshielded
from gradwatch.stats.module_outputs import first_tensor
from gradwatch.structures import map_floating


class Capture:
    """Hooks that record each call of the modules owning trainable parameters and the signal
    at each call's output, grouped by forward pass of the model (`passes`); `remove()` takes
    them off. Records only while `active` (the watcher sets it on probe steps)."""

    def __init__(self, model: nn.Module, *, shield: Shield = unshielded) -> None:
        self.passes: list[dict[str, list[Call]]] = []
        self.active = True
        self._add_into = shield(_add_into)
        self.fail = shield(_raise)  # a fault of gradwatch's own, found outside a hook
        self._add_span = shield(self._add_workspace)
        self._workspace = torch.zeros(0)
        self._needed = 0
        # The step's state lives in lists that only grow (a compiled forward loses attribute
        # stores made by its hooks): where each kept signal ends, and what found no room.
        self._ends: list[int] = []
        self._left_out: list[str] = []
        self._handles: list[Any] = [model.register_forward_pre_hook(shield(self._new_pass))]
        self._swapped: list[nn.Module] = []
        try:
            self._hook(model, shield)
        except BaseException:  # no swapped class or hook is left behind a failed set-up
            self.remove()
            raise

    def _hook(self, model: nn.Module, shield: Shield) -> None:
        inside: tuple[str, ...] = ()  # the names under a swapped module: it records them
        for name, module in model.named_modules():
            if name.startswith(inside):
                continue
            if capturable(module):  # records its linear maps itself: no hooks in it
                swap_in(module, self, name)
                self._swapped.append(module)
                inside = (*inside, f"{name}." if name else "")  # "": the root, so all
            elif any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(
                    module.register_forward_hook(shield(self._record(name)), with_kwargs=True)
                )

    def reserve(self, device: torch.device) -> None:
        """Before a step it records: room for the signals of the largest step seen, zeroed."""
        self._needed = max(self._needed, self._ends[-1] if self._ends else 0)
        if self._needed > self._workspace.numel() or self._workspace.device != device:
            self._workspace = torch.zeros(self._needed, device=device)
        else:
            self._workspace.zero_()
        self._ends.clear()
        self._left_out.clear()

    @property
    def incomplete(self) -> bool:
        """Whether a signal of the step found no room in a compiled forward (`keep_signal`)."""
        return bool(self._left_out)

    def keep_signal(self, y: Tensor) -> Tensor | tuple[int, int, tuple[int, ...]] | None:
        """Where the step's backward puts the signal at y (float32): a span (start, stop, shape)
        of the workspace, read with `signal` once the backward is done; or a buffer of its own.

        The workspace is kept between steps (`reserve`) and filled in place by a tensor hook that
        slices it itself: in a compiled forward a hook cannot write into a tensor the graph made,
        nor into a view of the workspace the graph returns (aot_autograd fails), nor rebind an
        attribute (dynamo breaks the graph). Where the workspace is too small (the first step, or
        a larger batch): eagerly a buffer of its own; in a compiled forward None, and the step is
        `incomplete` (left out; `reserve` makes room for the next). Between `reserve`s the
        signals take consecutive spans: every pass of a step (gradient accumulation) has room."""
        start = self._ends[-1] if self._ends else 0
        stop = start + y.numel()
        self._ends.append(stop)
        if stop <= self._workspace.numel() and y.device == self._workspace.device:
            y.register_hook(functools.partial(self._add_span, start, stop))
            return start, stop, tuple(y.shape)
        if torch.compiler.is_compiling():
            self._left_out.append("no room")
            return None
        signal = torch.zeros(y.shape, device=y.device)
        y.register_hook(functools.partial(self._add_into, signal))
        return signal

    def resolve(self, passes: list[dict[str, list[Call]]]) -> None:
        """After the backward: each call's signal as a tensor, batch first."""
        for calls in passes:
            for call in (c for module_calls in calls.values() for c in module_calls):
                kept = call.signal
                if isinstance(kept, tuple):
                    start, stop, shape = kept
                    kept = self._workspace[start:stop].view(shape)
                if kept is not None and call.batch_first:  # nn.MultiheadAttention's [L, B, ...]
                    kept = kept.transpose(0, 1)
                call.signal = kept

    def _add_workspace(self, start: int, stop: int, grad: Tensor) -> None:
        # the hook reads the workspace itself: a view made in the forward is no hook's to fill
        self._workspace[start:stop].add_(grad.reshape(-1))

    def _new_pass(self, module: nn.Module, args: Any) -> None:
        if self.active and torch.is_grad_enabled():
            self.passes.append({})

    def _record(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not self.active or not torch.is_grad_enabled() or not self.passes:
                return
            y = output if isinstance(output, Tensor) else first_tensor(output)
            signal = None
            if y is not None and y.requires_grad:
                signal = self.keep_signal(y)
                if signal is None:
                    return
            self.passes[-1].setdefault(name, []).append(
                Call(map_floating(args, Tensor.detach), map_floating(kwargs, Tensor.detach), signal)
            )

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._swapped:
            swap_out(module, self)
        self._swapped.clear()


def _add_into(buffer: Tensor, grad: Tensor) -> None:
    buffer.add_(grad)


def _raise(error: BaseException) -> None:
    raise error
