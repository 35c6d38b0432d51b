"""The process group as gradwatch sees it: strategy, rank, and the reductions that turn per-rank
partial statistics into whole-model ones.

Strategies:
- `none`: one process, or an initialised process group and a model the user replicates across
  ranks himself (every rank holds the whole model and its own batch).
- `ddp`: `DistributedDataParallel`; gradwatch watches `model.module`, so names carry no `module.`
  prefix. Gradients are averaged over ranks by DDP: per-tensor statistics need no collective.
- `fsdp2`: parameters are DTensors sharded on dim 0 by `fully_shard` over a 1-D device mesh that
  spans every rank. Each rank computes its shard's partial statistics; they are combined at flush.

What is combined, and when (W = world size, r = rank):
- per-tensor (fsdp2 only), at flush: ‖g‖ = √Σ_r‖g_r‖², max|g| = max_r, non-finite counts summed,
  ‖θ‖ = √Σ_r‖θ_r‖², ‖Δθ‖ likewise; one f64 SUM and one MAX all-reduce of the block.
- module statistics (every data-parallel strategy), per probe step: one SUM all-reduce of the
  per-module moments and per-unit counts (see `stats/flow.py`).
- non-finite flags, at flush: in the module statistics' SUM all-reduce; a flag is sent as 2^-r,
  so the sum names the lowest rank whose output held NaN/Inf.
- logged scalars, at flush: gathered from every rank with their names (bytes on the device) and
  combined on the host by the writer: the mean over the ranks that logged them.
- the flush itself: every collective covers the buffers' whole capacity (`flush_every` rows), so
  its shapes are the same on every rank whatever each flushes; each rank's (rows, first step) is
  gathered and compared on the host at the next flush, when its copy has long arrived.
- guard decisions, per step, only for guards that need them (a global norm under fsdp2, "any rank
  non-finite" for SkipNonFinite and Rollback).

Every collective here is issued by all ranks at the same point of the same step (the schedule is
checked to be equal on all ranks at `watch()`), so ranks never wait for one another forever.
This module imports only torch (and numpy, for the host side of the scalars).
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    import torch.distributed as dist

    _AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover - builds without distributed support
    _AVAILABLE = False


def _loaded(module: str, name: str) -> Any:
    """`name` from `module` if something imported that module already, else None. No DTensor or
    FSDP2 module exists before torch.distributed.tensor / .fsdp are imported, so gradwatch never
    imports them itself (about 0.8 s of `import gradwatch` on 2 cores)."""
    return getattr(sys.modules.get(module), name, None)


# A rank above this is named as this one in non-finite flags (2^-r must stay a normal float64).
_MAX_NAMED_RANK = 1000


@dataclass(frozen=True)
class Reduction:
    """Sums and maxima over one process group; the identity where `group` is None.

    Each call is one all-reduce of the given tensor, in place, and returns it.
    """

    group: Any = None
    active: bool = False

    def sum(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def gather(self, tensor: Tensor) -> Tensor:
        """[group size, *tensor.shape]: `tensor` of every rank, in rank order (one all-gather);
        [1, *shape] where inactive."""
        if not self.active:
            return tensor[None]
        out = tensor.new_empty((dist.get_world_size(self.group), *tensor.shape))
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=self.group)
        return out


LOCAL = Reduction()


@dataclass(frozen=True)
class Topology:
    """How the watched model is spread over processes.

    `model` is the module gradwatch watches (DDP's wrapper removed). `ranks` reduces over every
    rank (data-parallel statistics and decisions), `shards` over the ranks that hold shards of one
    parameter (fsdp2; the identity otherwise).
    """

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    ranks: Reduction = LOCAL
    shards: Reduction = LOCAL

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    @property
    def writes(self) -> bool:
        """Whether this process writes the run store (global rank 0 only)."""
        return self.rank == 0

    def meta(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "backend": self.backend,
            "writer_rank": 0,
        }


def is_dtensor(tensor: Any) -> bool:
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def module_class(module: nn.Module) -> type[nn.Module]:
    """The user's class of a module, beneath the class `fully_shard` swaps in (FSDPLinear...)."""
    kind = type(module)
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is not None and isinstance(module, fsdp_module):
        mro = kind.__mro__
        return next(c for c in mro[mro.index(fsdp_module) + 1 :] if issubclass(c, nn.Module))
    return kind


def wrappers(model: nn.Module) -> list[nn.Module]:
    """The model and the modules it wraps: DDP's `.module` and `torch.compile`'s `_orig_mod`, in
    any order, down to the user's own module (the last)."""
    chain = [model]
    while True:
        if _AVAILABLE and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return chain
        chain.append(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module to watch, so that names are the user's own (no `module.` or `_orig_mod.`)."""
    return wrappers(model)[-1]


def topology(model: nn.Module) -> Topology:
    """Find the strategy of `model` under the default process group, or raise a clear error for a
    set-up gradwatch does not support. `model` is the model as the user passed it."""
    _reject_unsupported(model)
    if not (_AVAILABLE and dist.is_initialized()):
        if any(is_dtensor(p) for p in model.parameters()):
            raise ValueError(
                "the model has DTensor parameters but no process group is initialised; call "
                "torch.distributed.init_process_group() before gw.watch()"
            )
        return Topology()
    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    ranks = Reduction(None, world > 1)
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in wrappers(model)):
        return Topology("ddp", rank, world, backend, ranks)
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return Topology("none", rank, world, backend, ranks)
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None or not any(isinstance(m, fsdp_module) for m in model.modules()):
        raise ValueError(
            "the model has DTensor parameters but no FSDP2 module (fully_shard): tensor "
            "parallelism and other DTensor layouts are not supported yet; gradwatch supports "
            "DDP and FSDP2"
        )
    if len(sharded) != len(params):
        raise ValueError(
            f"{len(params) - len(sharded)} trainable parameters are plain tensors while the rest "
            "are DTensors: apply fully_shard to the root module too (fully_shard(model)), so "
            "every parameter is sharded"
        )
    from torch.distributed.tensor import Shard  # loaded: the parameters are DTensors

    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                "gradwatch supports FSDP2 with parameters sharded on dim 0 over a 1-D device mesh "
                f"(fully_shard); found placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh. Tensor parallelism, HSDP and other DTensor "
                "layouts are not supported yet"
            )
    if mesh.size() != world:
        raise ValueError(
            f"the FSDP2 mesh spans {mesh.size()} of {world} ranks; gradwatch supports a mesh "
            "over every rank (HSDP and partial meshes are not supported yet)"
        )
    return Topology("fsdp2", rank, world, backend, ranks, Reduction(mesh.get_group(), True))


def _reject_unsupported(model: nn.Module) -> None:
    kind = type(model)
    if kind.__module__.startswith("deepspeed") or kind.__name__ == "DeepSpeedEngine":
        raise ValueError(
            "DeepSpeed engines are not supported: gradwatch supports DDP and FSDP2 (fully_shard)"
        )
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) is not supported: its flat parameters hide the "
            "per-tensor gradients. Use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP"
        )


def process_group_alive() -> bool:
    """Whether the default process group still exists (a script may destroy it first)."""
    return _AVAILABLE and dist.is_initialized()


def collective_device(topo: Topology, device: torch.device) -> torch.device:
    """Where small collective tensors live: the model's device, or the current CUDA device for
    NCCL when the model sits on the CPU."""
    if topo.backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def agree(topo: Topology, fingerprint: str, error: BaseException | None, device) -> None:
    """Check at `watch()` that every rank set up the same watch, with one collective.

    `fingerprint` describes the schedule, guards and watched names; `error` is what failed on this
    rank while setting up (e.g. rank 0 could not create the run store). Every rank raises the same
    error together, so none is left waiting in a later collective.
    """
    if not topo.distributed:
        if error is not None:
            raise error
        return
    code = float(zlib.crc32(fingerprint.encode()))
    failed = 0.0 if error is None else 1.0
    values = torch.tensor([failed, code, -code], dtype=torch.float64, device=device)
    topo.ranks.max(values)
    if values[0] > 0:
        messages: list[Any] = [None] * topo.world_size
        dist.all_gather_object(messages, None if error is None else f"{error}")
        if error is not None:
            raise error
        failed_ranks = [(r, m) for r, m in enumerate(messages) if m is not None]
        raise RuntimeError(
            "gw.watch() failed on other ranks: "
            + "; ".join(f"rank {r}: {m}" for r, m in failed_ranks)
        )
    if values[1] != -values[2]:
        prints: list[Any] = [None] * topo.world_size
        dist.all_gather_object(prints, fingerprint)
        differing = [r for r, p in enumerate(prints) if p != prints[0]]
        raise ValueError(
            f"gw.watch() was called differently on ranks {differing} than on rank 0 (schedule, "
            "guards or model): every rank must pass the same every/probe_every/flush_every, the "
            f"same guards and the same model. Rank 0: {prints[0]}; rank {differing[0]}: "
            f"{prints[differing[0]]}"
        )


def rank_code(rank: int) -> float:
    """The value a non-finite flag sends for `rank`: 2^-rank (see `lowest_rank`)."""
    return math.ldexp(1.0, -min(rank, _MAX_NAMED_RANK))


def lowest_rank(codes: Tensor) -> Tensor:
    """From a sum of 2^-r over the flagging ranks, the lowest such r (NaN where the sum is 0).

    Σ 2^-r lies in [2^-r0, 2^(1-r0)) for r0 the lowest rank, so r0 = ceil(-log2(sum)).
    """
    return torch.where(codes > 0, torch.ceil(-torch.log2(codes)), torch.nan)


def flush_header(rows: int, first_step: int, device: torch.device) -> Tensor:
    """[rows, first_step] of this rank's flush, float64 on `device`: gathered from every rank and
    checked on the host at the next flush (`check_flushed_alike`). Made by fills: no copy."""
    header = torch.full((2,), float(rows), dtype=torch.float64, device=device)
    header[1] = float(first_step)  # a Python number: filled on the device
    return header


def check_flushed_alike(headers: np.ndarray, rows: int, first_step: int) -> None:
    """Raise when the gathered `headers` [world, 2] of a flush differ: ranks left the common
    schedule (e.g. `Watcher.flush()` called on some ranks only). Every rank holds the same
    headers, so every rank raises at the same point."""
    if (headers != headers[0]).any():
        raise RuntimeError(
            f"ranks flushed different steps (this rank: {rows} steps from step {first_step}): "
            "call Watcher.flush(), log() and close() on every rank alike"
        )


# Logged scalars at a distributed flush are gathered from every rank with their names, encoded
# as bytes, and combined by name on the host by the writer: the ranks need not agree on their
# names before the collective, so the flush makes no host sync.
GATHERED_SCALARS = 256  # scalar names per rank at most (more are kept on this rank only)
NAME_BYTES = 128


def encode_names(names: Sequence[str]) -> bytes:
    """The first GATHERED_SCALARS names as rows of NAME_BYTES bytes (UTF-8, zero-padded); a
    longer name keeps its head and '#' + its crc32 in hex, so it stays unique."""
    rows = bytearray(GATHERED_SCALARS * NAME_BYTES)
    for i, name in enumerate(names[:GATHERED_SCALARS]):
        raw = _short(name).encode()
        rows[i * NAME_BYTES : i * NAME_BYTES + len(raw)] = raw
    return bytes(rows)


def _short(name: str) -> str:
    raw = name.encode()
    if len(raw) <= NAME_BYTES:
        return name
    head = raw[: NAME_BYTES - 9].decode(errors="ignore")
    return f"{head}#{zlib.crc32(raw):08x}"


def combine_gathered_scalars(
    values: np.ndarray, names: np.ndarray, own: tuple[str, ...], norms: set[str], sharded: bool
) -> tuple[tuple[str, ...], np.ndarray]:
    """The scalars of a flush over all ranks, on the host: `values` [world, rows,
    GATHERED_SCALARS] and `names` [world, GATHERED_SCALARS * NAME_BYTES] (uint8) as gathered,
    `own` this rank's names. Returns the union of the names (in rank order, then first use) and
    [rows, len(union)]: each scalar's mean over the ranks that recorded it at a step (NaN where
    none did), except `norms` under fsdp2, per-shard norm parts that combine as √Σ_r x_r²."""
    full = {_short(n): n for n in own}
    columns: dict[str, list[np.ndarray]] = {}
    for rank_values, raw in zip(values, names, strict=True):
        for i, row in enumerate(raw.reshape(GATHERED_SCALARS, NAME_BYTES)):
            name = bytes(row).rstrip(b"\0").decode(errors="replace")
            if name:
                columns.setdefault(full.get(name, name), []).append(rank_values[:, i])
    union = tuple(columns)
    out = np.full((values.shape[1], len(union)), np.nan, dtype=np.float32)
    for j, name in enumerate(union):
        stacked = np.stack(columns[name]).astype(np.float64)
        recorded = ~np.isnan(stacked)
        count = recorded.sum(axis=0)
        if sharded and name in norms:
            total = np.sqrt(np.where(recorded, stacked**2, 0.0).sum(axis=0))
        else:
            total = np.where(recorded, stacked, 0.0).sum(axis=0) / np.maximum(count, 1)
        out[:, j] = np.where(count > 0, total, np.nan)
    return union, out


def shard_like(param: Tensor, local: Tensor) -> Tensor:
    """A tensor laid out like `param` from this rank's part: a DTensor for a sharded parameter's
    same-shaped state (Adam's moments), the local tensor otherwise."""
    if is_dtensor(param) and local.dim() > 0:
        from torch.distributed.tensor import DTensor  # loaded: `param` is one

        return DTensor.from_local(
            local,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return local
