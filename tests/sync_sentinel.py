"""A sentinel for host syncs in gradwatch's code that works on the CPU.

On a GPU a host sync stalls the CPU until the device has caught up; on the CPU nothing stalls, so
no test can time one there. The sentinel instead recognises the operations that sync on a GPU:

- a device value read on the host: `aten::_local_scalar_dense` (`item()`, `bool()`, `float()`,
  `int()` of a tensor, a tensor in an `if`), `aten::equal`, and `tolist()`, `numpy()`, `cpu()`;
- an output whose shape depends on the data: `nonzero`, `masked_select`, `unique`, `bincount`,
  `repeat_interleave` without `output_size`, indexing or assigning with a boolean mask;
- a tensor made on the host inside the step: from Python data (`torch.tensor`, `as_tensor`,
  `from_numpy`: a host-to-device copy), or by a factory called without a `device` (made on the
  host, so using it on the device copies it).

An operation is gradwatch's when the innermost Python frame of its call outside torch (and the
standard library) is in gradwatch's source: the user's own syncs and the optimizer's are not
gradwatch's to fix (a gradwatch `TorchFunctionMode` passes the user's calls on: its
`__torch_function__` frame does not count). Two markers on the line (or the line above) let a
gradwatch line pass:
- `# host sync:` a deliberate sync: the guards that decide on the host (skip a step, roll back);
- `# host data:` the tensor read or made there is on the host even when training on a GPU (an
  optimizer's step counter, a PackedSequence's batch sizes, the pinned source of an asynchronous
  copy in `gradwatch/stats/device.py`): no sync there; the CUDA test checks it.

Both a `TorchFunctionMode` (for the Python-level calls: factories as called, `tolist`) and a
`TorchDispatchMode` (for the aten operations) watch the thread that enters them; the writer thread
is not watched, its host work is its job. Violations are collected, not raised: gradwatch's hooks
catch exceptions (a monitor never breaks the run), so a raise would only close the watcher.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch

_GRADWATCH = os.path.dirname(gradwatch.__file__) + os.sep
_PASSED_THROUGH = (
    os.path.dirname(torch.__file__) + os.sep,
    sysconfig.get_paths()["stdlib"] + os.sep,
    os.path.abspath(__file__),
)
MARKERS = ("# host sync:", "# host data:")

_READS = {"tolist", "numpy", "cpu"}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.from_numpy}
_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.scalar_tensor, torch.empty_strided,
}  # fmt: skip
_ATEN = torch.ops.aten
_SCALAR_READS = {_ATEN._local_scalar_dense.default, _ATEN.equal.default}
_DATA_SHAPED = {
    _ATEN.nonzero.default, _ATEN.masked_select.default, _ATEN._unique.default,
    _ATEN._unique2.default, _ATEN.unique_dim.default, _ATEN.unique_consecutive.default,
    _ATEN.unique_dim_consecutive.default, _ATEN.bincount.default,
}  # fmt: skip
_INDEXING = {
    _ATEN.index.Tensor, _ATEN.index_put.default, _ATEN.index_put_.default,
    _ATEN._index_put_impl_.default,
}  # fmt: skip


def gradwatch_site() -> str | None:
    """'path:line in function' of the gradwatch frame that made the current call, or None when
    the call is not gradwatch's or its line is marked (`MARKERS`)."""
    frame = sys._getframe(1)
    while frame is not None and _passes_through(frame.f_code):
        frame = frame.f_back
    if frame is None:
        return None
    return unmarked_site(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


def unmarked_site(path: str, line: int, function: str = "") -> str | None:
    """'gradwatch/...:line in function' when `path` is gradwatch's source and the line is not
    marked (`MARKERS`, on the line or the line above); else None."""
    if not path.startswith(_GRADWATCH):
        return None
    if any(m in linecache.getline(path, n) for m in MARKERS for n in (line, line - 1)):
        return None
    return f"gradwatch/{path[len(_GRADWATCH) :]}:{line} in {function or '?'}"


def _passes_through(code: Any) -> bool:
    """torch's and the standard library's frames, this file's, and a gradwatch TorchFunctionMode's
    `__torch_function__`, which calls each of the user's torch functions on its way through."""
    return code.co_filename.startswith(_PASSED_THROUGH) or (
        code.co_name == "__torch_function__" and code.co_filename.startswith(_GRADWATCH)
    )


class _Calls(TorchFunctionMode):
    report: Callable[[str], None]  # set by SyncSentinel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _FROM_DATA:
            self.report(f"torch.{name}(...) copies Python data to the device")
        elif func in _FACTORIES and "device" not in kwargs and "out" not in kwargs:
            self.report(f"torch.{name}(...) without device= makes the tensor on the host")
        elif name in _READS and args and isinstance(args[0], torch.Tensor):
            self.report(f"Tensor.{name}() reads the tensor on the host")
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    report: Callable[[str], None]  # set by SyncSentinel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR_READS:
            self.report(f"{func} reads a device value on the host")
        elif func in _DATA_SHAPED:
            self.report(f"{func}: its output's shape depends on the data")
        elif func == _ATEN.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.report(f"{func} without output_size: its output's shape depends on the data")
        elif func in _INDEXING and _has_mask(args[1]):
            self.report(f"{func} with a boolean mask: its shape depends on the data")
        return func(*args, **kwargs)


def _has_mask(indices: Any) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


class SyncSentinel:
    """`with SyncSentinel() as sentinel: <training>`, then `sentinel.sites`: {site: what} of every
    host sync gradwatch's code made inside (empty when there was none)."""

    def __init__(self) -> None:
        self.sites: dict[str, str] = {}
        self._modes = (_Calls(), _Ops())
        for mode in self._modes:
            mode.report = self._report

    def _report(self, what: str) -> None:
        site = gradwatch_site()
        if site is not None:
            self.sites.setdefault(site, what)

    def __enter__(self) -> SyncSentinel:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def summary(self) -> str:
        return "\n".join(f"{site}: {what}" for site, what in sorted(self.sites.items()))
