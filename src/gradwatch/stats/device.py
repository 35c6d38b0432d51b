"""Host values on the device without a host sync.

A copy from pageable host memory to a GPU (`torch.tensor(data, device=cuda)`,
`host_tensor.to(cuda)`) waits until the device has caught up: a host sync in the middle of the
training step. The step path puts its host values (index lists, time positions, constant tables)
on the device through `to_device`, which copies from pinned memory asynchronously: the CPU queues
the copy and goes on. PyTorch's caching host allocator keeps the pinned block until the copy has
run, so the host tensor may go out of scope at once.

Lines that read or make host data that look like syncs on the CPU (where every tensor is a host
tensor) carry `# host data:`: the test sentinel (tests/sync_sentinel.py) lets them pass, and the
CUDA test checks the claim under `torch.cuda.set_sync_debug_mode("warn")`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

Values = Sequence[float] | Sequence[int] | Tensor


def to_device(values: Values, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """`values` (Python numbers or a host tensor) as a tensor on `device`, with no host sync.

    On a CUDA device: through pinned memory and an asynchronous copy. On the CPU: the host tensor
    itself. Other accelerators: a plain copy (their pinned-memory support varies).
    """
    host = torch.as_tensor(values, dtype=dtype, device="cpu")  # host data: made on the host
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The tensor of `values` on `device`, made once per (values, device, dtype) and shared:
    read it, never write to it. No host sync after the first call (and none in it on a GPU).
    Traced by torch.compile, a constant of the graph (dynamo does not trace through a cache)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached(values, device, dtype)


@functools.lru_cache(maxsize=256)
def _cached(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return to_device(values, device, dtype)
