"""Step-time overhead of gradwatch under DDP and FSDP2: 2 processes, gloo, on the CPU.

Every rank trains the same workload (its own batch of the usual size) wrapped in DDP, or with
`fully_shard` on each transformer layer, each other Linear/Conv and the root; variants run
interleaved in the same order on every rank (their order rotates each round), as in
`overhead.py`. The floor is one `torch._foreach_norm` over this rank's gradients (its shards under
FSDP2). Rank 0 prints the table and writes it to results/distributed-cpu.md.

    python benchmarks/distributed.py                       # both strategies, all workloads
    python benchmarks/distributed.py --strategies fsdp2 --workloads mlp --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from overhead import (
    STABLE_MALLOC,
    Stepper,
    Variant,
    format_table,
    gradwatch_variant,
    measure,
    plain,
)
from results_file import write_results
from workloads import WORKLOADS, Workload

from gradwatch.distributed import local_tensor

WORLD = 2


@contextlib.contextmanager
def local_foreach_norm_floor(work: Workload, tmp: Path) -> Iterator[Stepper]:
    params = list(work.model.parameters())
    yield Stepper(work, lambda: torch._foreach_norm([local_tensor(p.grad) for p in params]))


VARIANTS: dict[str, Variant] = {
    "plain": plain,
    "floor: foreach_norm (this rank's gradients)": local_foreach_norm_floor,
    "gradwatch default (probe_every=10)": gradwatch_variant(),
}


def distribute(work: Workload, strategy: str) -> Workload:
    """The workload with its model wrapped for `strategy` and a fresh optimizer over it."""
    model = work.model
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        # One unit per transformer layer (MultiheadAttention reads its out_proj weight without
        # calling it, so that Linear cannot be a unit of its own), one per other Linear/Conv.
        layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
        inside = {id(m) for layer in layers for m in layer.modules()}
        others = [
            m
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside
        ]
        for unit in layers + others:
            fully_shard(unit)
        fully_shard(model)
    return work.with_model(model)


def rank_main(args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{args.rendezvous}", rank=args.rank, world_size=WORLD
    )
    torch.set_num_threads(1)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for strategy in args.strategies:
                for name in args.workloads:
                    torch.manual_seed(0)
                    work = distribute(WORKLOADS[name](torch.device("cpu")), strategy)
                    results[f"{strategy} {name}"] = measure(
                        work, VARIANTS, args.rounds, args.steps, Path(tmp)
                    )
    finally:
        dist.destroy_process_group()
    if args.rank != 0:
        return
    header = (
        f"# gradwatch distributed overhead ({WORLD} ranks, gloo, CPU, 1 thread per rank, "
        f"torch {torch.__version__})\n\n"
        f"Command: `python benchmarks/distributed.py --rounds {args.rounds} --steps {args.steps}"
        f" --strategies {' '.join(args.strategies)} --workloads {' '.join(args.workloads)}`. "
        "Rank 0's total run times and median steps over interleaved rounds (see overhead.py); "
        "each rank "
        "trains on its own batch of the workload's size. DDP wraps the model; FSDP2 applies "
        "fully_shard to each transformer layer, each other Linear/Conv and the root. The floor "
        "reads this rank's gradients once (its shards under FSDP2). Allocator thresholds fixed "
        "as in overhead.py."
    )
    table = format_table(results, header)
    print(table)
    write_results(args.out, table)


def launch(args: argparse.Namespace) -> int:
    """Start WORLD ranks of this script; kill them all if one fails."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, *sys.argv[1:], "--rendezvous", f"{tmp}/rendezvous"]
        env = {**os.environ, **STABLE_MALLOC, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([*command, "--rank", str(r)], env=env) for r in range(WORLD)]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return max(codes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="distributed-cpu.md", help="under benchmarks/results/")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is None:
        return launch(args)
    rank_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
