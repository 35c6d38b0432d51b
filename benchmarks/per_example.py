"""Per-example gradient norms on the three benchmark workloads: gradwatch against BackPACK and
Opacus, interleaved in one process (see overhead.py for the method).

Each variant is a full training step that also yields every example's gradient norm:
gradwatch's ghost norms (the hooks of `gw.watch(..., per_example=True)` and their computation,
without the other probe statistics), the whole gradwatch probe step with them (every statistic,
histograms off), BackPACK's `BatchL2Grad` extension and Opacus's ghost norms
(`GradSampleModuleFastGradientClipping`, `get_norm_sample()`). A peer that cannot run a workload
is reported as failing, with its error.

    python benchmarks/per_example.py   # -> results/per_example-cpu.md
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Stepper, gradwatch_variant, plain, run_benchmark
from workloads import Workload

from gradwatch.distributed import Topology
from gradwatch.stats.example_probes import ExampleProbes


@dataclass
class CustomStep:
    """A stand-in for a Workload whose step runs `step`; what `time_steps` needs of it."""

    inputs: torch.Tensor
    step: Callable[[Callable[[], None] | None], torch.Tensor]


@contextlib.contextmanager
def gradwatch_ghost_norms(work: Workload, tmp: Path) -> Iterator[Stepper]:
    names = [n for n, p in work.model.named_parameters() if p.requires_grad]
    probes = ExampleProbes(work.model, names, "mean", work.inputs.device, Topology())
    step_square = torch.zeros((), device=work.inputs.device)
    probes.attach()
    probes.active = True

    def norms() -> None:
        found = probes.record(step_square)
        probes.active = True  # the next step: room for its signals, zeroed
        if found is not None:
            found[0].totals()

    try:
        yield Stepper(work, norms)
    finally:
        probes.detach()


@contextlib.contextmanager
def backpack_l2(work: Workload, tmp: Path) -> Iterator[Stepper]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(work.model)
    loss_fn = extend(nn.CrossEntropyLoss())

    def step(between: Callable[[], None] | None) -> torch.Tensor:
        loss = loss_fn(model(work.inputs), work.targets)
        work.optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():  # a norm left from an earlier step must not pass for one
            if hasattr(p, "batch_l2"):
                del p.batch_l2
        with backpack(BatchL2Grad()):
            loss.backward()
        torch.stack([p.batch_l2 for p in model.parameters()]).sum(dim=0)
        work.optimizer.step()
        return loss

    try:
        yield Stepper(CustomStep(work.inputs, step))  # type: ignore[arg-type]
    finally:
        from backpack import memory_cleanup

        for module in [model, loss_fn, *model.modules()]:
            memory_cleanup(module)
            for hooks in (module._forward_hooks, module._backward_hooks):
                hooks.clear()
            # extend() skips a module flagged as extended: without the flag the next round's
            # extend() hooks it again (before, later rounds ran BackPACK with no hooks at all)
            if hasattr(module, "_backpack_extend"):
                del module._backpack_extend


@contextlib.contextmanager
def opacus_ghost_norms(work: Workload, tmp: Path) -> Iterator[Stepper]:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        work.model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True
    )

    def step(between: Callable[[], None] | None) -> torch.Tensor:
        loss = nn.functional.cross_entropy(wrapped(work.inputs), work.targets)
        work.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        wrapped.get_norm_sample()
        work.optimizer.step()
        return loss

    try:
        yield Stepper(CustomStep(work.inputs, step))  # type: ignore[arg-type]
    finally:
        wrapped._close()


VARIANTS = {
    "plain": plain,
    "gradwatch ghost norms": gradwatch_ghost_norms,
    "gradwatch probe step": gradwatch_variant(probe_every=1, histogram_every=None),
    "gradwatch probe step with per_example": gradwatch_variant(
        probe_every=1, histogram_every=None, per_example=True
    ),
    "BackPACK BatchL2Grad": backpack_l2,
    "Opacus ghost norms": opacus_ghost_norms,
}

if __name__ == "__main__":
    run_benchmark(VARIANTS, "per_example", __doc__.split("\n\n")[0])
