"""Training scenarios run by every rank of the multi-process tests (`test_distributed.py`).

`python distributed_workers.py SCENARIO OUT RANK WORLD` joins a gloo process group through a file
in OUT, runs the scenario under the sync sentinel and saves what the test checks (the host syncs
in gradwatch's code included) as OUT/<scenario>-rank<RANK>.json. The
same model and data functions give the single-process references in the test itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from sync_sentinel import SyncSentinel
from torch import nn

import gradwatch as gw

GLOBAL_BATCH = 8
STEPS = 5
# Host syncs made by gradwatch's code in the training steps of every `train()` of this process:
# the flushes' collectives, the guards' all-reduces and the FSDP2 shard combination included.
SYNC_SITES: dict[str, str] = {}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


class Recurrent(nn.Module):
    """A GRU over the 6 features read as 3 time steps of 2, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x.reshape(x.shape[0], 3, 2))[0][:, -1])


def make_recurrent() -> Recurrent:
    torch.manual_seed(0)
    return Recurrent()


class Attentive(nn.Module):
    """The 6 features as 3 tokens of 2, one explicit-softmax self-attention (2 heads), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 3, 2))
        q, k, v = (t.view(-1, 3, 2, 4).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        attended = ((q @ k.transpose(-2, -1)) / 2).softmax(dim=-1) @ v
        return self.head(attended.transpose(1, 2).reshape(-1, 3, 8).mean(dim=1))


def make_attentive() -> Attentive:
    torch.manual_seed(0)
    return Attentive()


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 6, generator=generator),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(steps)
    ]


def shard_of_batch(
    tensor: torch.Tensor, rank: int, world: int, split: tuple[int, ...] | None = None
) -> torch.Tensor:
    """This rank's part of the batch: equal parts, or `split` examples per rank."""
    sizes = split or (tensor.shape[0] // world,) * world
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def train(
    model: nn.Module,
    run_dir: Path,
    rank: int = 0,
    world: int = 1,
    steps: int = STEPS,
    guards=(),
    lr: float = 0.1,
    poison_input: tuple[int, int] | None = None,
    poison_grad: tuple[int, int] | None = None,
    spike_at: int | None = None,
    micro_batches: int = 1,
    one_batch: bool = False,
    rank_scalars: bool = False,
    per_example: bool = False,
    split: tuple[int, ...] | None = None,
) -> gw.Watcher:
    """Train `model` on this rank's part of the global batches under gw.watch and close it.

    poison_input / poison_grad = (step, rank): that rank's input, or its gradient of the first
    layer's weight (its shard, under FSDP2), gets a NaN at that step. spike_at multiplies the loss
    by 50 at that step on every rank (a gradient spike for the clipping guards). micro_batches > 1
    accumulates gradients over that many parts of the rank's batch (DDP: under no_sync but the
    last), each loss divided by their number. one_batch trains on the first batch at every step.
    rank_scalars also logs `rank_value` (the rank) and a scalar of this rank only, `only_<rank>`.
    per_example watches with per-example norms; split gives each rank that many examples of the
    global batch (uneven batches).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    w = gw.watch(
        model,
        optimizer,
        run_dir=run_dir,
        probe_every=2,
        flush_every=3,
        histogram_every=1,
        guards=list(guards),
        per_example=per_example,
    )
    with SyncSentinel() as sentinel, w:  # the steps and close()'s flush; not watch()
        data = batches(steps)
        for step, (x, y) in enumerate([data[0]] * steps if one_batch else data):
            x, y = shard_of_batch(x, rank, world, split), shard_of_batch(y, rank, world, split)
            if poison_input == (step, rank):
                x = x.clone()
                x[0, 0] = float("nan")
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for part in range(micro_batches):
                last = part == micro_batches - 1
                syncing = (
                    model.no_sync()
                    if isinstance(model, nn.parallel.DistributedDataParallel) and not last
                    else contextlib.nullcontext()
                )
                with syncing:
                    xs, ys = (
                        shard_of_batch(x, part, micro_batches),
                        shard_of_batch(y, part, micro_batches),
                    )
                    loss = nn.functional.cross_entropy(model(xs), ys) / micro_batches
                    if step == spike_at:
                        loss = loss * 50
                    loss.backward()
                    total = total + loss.detach()
            if poison_grad == (step, rank):
                grad = first_weight(model).grad
                grad = grad.to_local() if hasattr(grad, "to_local") else grad
                grad[0, 0] = float("nan")
            optimizer.step()
            w.log(loss=total)
            if rank_scalars:
                w.log(rank_value=float(rank), **{f"only_{rank}": torch.tensor(rank + 1.0)})
    SYNC_SITES.update(sentinel.sites)
    return w


def first_weight(model: nn.Module) -> nn.Parameter:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner[0].weight


def full_parameters(model: nn.Module) -> dict[str, list]:
    """Every parameter as a full tensor (a collective under FSDP2), as nested lists."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    out = {}
    for name, p in inner.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().tolist()
    return out


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def fsdp2(reshard_after_forward: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def ddp() -> nn.Module:
    return nn.parallel.DistributedDataParallel(make_model())


def scenario_ddp(out: Path, rank: int, world: int) -> dict:
    """Statistics run (rank 1 passes another run_dir: it must create nothing), NaN in rank 1's
    input, and a NaN in rank 1's gradient only, under SkipNonFinite."""
    model = ddp()
    hooks_before = hook_count(model)
    train(model, out / f"ddp-rank{rank}", rank, world)
    result = {"hooks_left": hook_count(model) - hooks_before}
    train(nn.parallel.DistributedDataParallel(make_recurrent()), out / "ddp-rnn", rank, world)
    train(nn.parallel.DistributedDataParallel(make_attentive()), out / "ddp-attn", rank, world)
    train(ddp(), out / "ddp-noise", rank, world, steps=12, lr=0.0, one_batch=True)
    train(ddp(), out / "ddp-names", rank, world, rank_scalars=True)
    result["own_dir_exists"] = (out / f"ddp-rank{rank}").exists()
    w = train(ddp(), out / "ddp-nan-input", rank, world, poison_input=(2, 1))
    result["findings"] = [(f.kind, f.layer, f.step, f.evidence) for f in w.findings()]
    skipped = ddp()
    train(skipped, out / "ddp-skip", rank, world, guards=[gw.guards.SkipNonFinite()],
          poison_grad=(2, 1))  # fmt: skip
    result["skip_params"] = full_parameters(skipped)
    accumulated = ddp()
    w = train(accumulated, out / "ddp-accumulate", rank, world, micro_batches=2)
    result["accumulate_steps"] = w.step_count
    return result


def scenario_fsdp2(out: Path, rank: int, world: int) -> dict:
    """Statistics runs with reshard_after_forward True and False, clipping guards, and a NaN in
    rank 1's gradient shard only, under SkipNonFinite."""
    result = {}
    for reshard in (True, False):
        model = fsdp2(reshard)
        hooks_before = hook_count(model)
        train(model, out / f"fsdp2-reshard{reshard}", rank, world)
        result[f"hooks_left_{reshard}"] = hook_count(model) - hooks_before
    clipped = fsdp2()
    train(clipped, out / "fsdp2-clip", rank, world, steps=8, lr=0.5, spike_at=6,
          guards=[gw.guards.ZClip(warmup=3), gw.guards.ClipNorm(0.5)])  # fmt: skip
    result["clip_params"] = full_parameters(clipped)
    skipped = fsdp2()
    w = train(skipped, out / "fsdp2-skip", rank, world, guards=[gw.guards.SkipNonFinite()],
              poison_grad=(2, 1))  # fmt: skip
    result["skip_params"] = full_parameters(skipped)
    result["skip_findings"] = [(f.kind, f.layer, f.step) for f in w.findings()]
    rolled_back = fsdp2()
    train(rolled_back, out / "fsdp2-rollback", rank, world, steps=6,
          guards=[gw.guards.Rollback(every=2)], poison_grad=(3, 1))  # fmt: skip
    result["rollback_params"] = full_parameters(rolled_back)
    return result


def scenario_bad_setup(out: Path, rank: int, world: int) -> dict:
    """Ranks that disagree on the schedule; a run_dir that already holds a run on rank 0."""
    errors = {}
    try:
        gw.watch(ddp(), None, run_dir=out / "mismatch", probe_every=10 if rank == 0 else 5)
    except ValueError as exc:
        errors["mismatch"] = str(exc)
    (out / "taken").mkdir(exist_ok=True)
    if rank == 0:
        (out / "taken" / "run.sqlite").write_bytes(b"")
    dist.barrier()
    try:
        gw.watch(ddp(), None, run_dir=out / "taken")
    except (FileExistsError, RuntimeError) as exc:
        errors["taken"] = f"{type(exc).__name__}: {exc}"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    tensor_parallel = parallelize_module(
        make_model(), init_device_mesh("cpu", (world,)), {"0": ColwiseParallel()}
    )
    try:
        gw.watch(tensor_parallel, None, run_dir=out / f"tp-{rank}")
    except ValueError as exc:
        errors["tensor_parallel"] = str(exc)
    errors["writers"] = sum(t.name == "gradwatch-writer" for t in threading.enumerate())
    return errors


def scenario_examples(out: Path, rank: int, world: int) -> dict:
    """per_example over the global batch: DDP with uneven batches (5 and 3 examples), DDP with
    two micro-batches, FSDP2 with equal batches; lr 0, so that every step's norms and noise
    scale compare with a single process at the same parameters."""
    train(ddp(), out / "examples-ddp", rank, world, steps=12, lr=0.0, per_example=True,
          split=(5, 3))  # fmt: skip
    train(ddp(), out / "examples-accumulate", rank, world, steps=12, lr=0.0, per_example=True,
          micro_batches=2)  # fmt: skip
    train(fsdp2(), out / "examples-fsdp2", rank, world, steps=12, lr=0.0, per_example=True)
    return {}


SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp2": scenario_fsdp2,
    "bad_setup": scenario_bad_setup,
    "examples": scenario_examples,
}


def main() -> None:
    scenario, out, rank, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        result = SCENARIOS[scenario](out, rank, world)
        result["sync_sites"] = SYNC_SITES
        (out / f"{scenario}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # The results are written and the group is gone. gloo's threads now and then abort the
    # interpreter's own teardown ("terminate called without an active exception", seen in 2 of
    # 8 suite runs, also before gradwatch changed anything there): nothing under test runs after
    # this point, so end without it. A failing scenario still exits through its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
