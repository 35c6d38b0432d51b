"""What gradwatch costs a user on the three benchmark workloads: the total time of a run.

Variants run interleaved in one process (their order rotates each round); each round times one
whole run of `--steps` steps per variant, from its set-up to its close: gw.watch(), the probe
steps, the histogram steps, the flushes and close() with its last flush, as a user pays them.
The table gives each run's total time (mean and spread over the rounds), its ratio to plain
training (mean, min and max of the per-round ratios: the runs of one round ran back to back),
and the median step as a second column (a typical step: nine in ten are not probe steps). The
floors are what any gradient monitor must pay: one `torch._foreach_norm` over all gradients, and
`clip_grad_norm_` (a norm pass plus a scaling pass). guards.py, probes.py, per_example.py and
distributed.py measure with the same functions.

    python benchmarks/overhead.py                 # CPU, all workloads -> results/overhead-cpu.md
    python benchmarks/overhead.py --device cuda   # -> results/overhead-cuda.md
    python benchmarks/overhead.py --compile       # torch.compile -> results/overhead-cpu-compile.md

With --compile every forward runs through torch.compile (inductor). The watched variant trains a
twin of the model (same weights and batch), compiled and watched once for the whole benchmark:
attaching and removing hooks around every round would recompile the model each time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_results
from workloads import WORKLOADS, Workload

import gradwatch as gw


@dataclass
class Stepper:
    """What a variant times: steps of `work`, with `between` run after backward."""

    work: Workload
    between: Callable[[], None] | None = None


Variant = Callable[[Workload, Path], contextlib.AbstractContextManager[Stepper]]


@contextlib.contextmanager
def plain(work: Workload, tmp: Path) -> Iterator[Stepper]:
    yield Stepper(work)


@contextlib.contextmanager
def foreach_norm_floor(work: Workload, tmp: Path) -> Iterator[Stepper]:
    params = list(work.model.parameters())
    yield Stepper(work, lambda: torch._foreach_norm([p.grad for p in params]))


@contextlib.contextmanager
def clip_grad_norm_floor(work: Workload, tmp: Path) -> Iterator[Stepper]:
    params = list(work.model.parameters())
    yield Stepper(work, lambda: torch.nn.utils.clip_grad_norm_(params, 1e6))


def gradwatch_variant(
    attention: bool = True,
    guards: Callable[[], list] = list,
    **kwargs: object,
) -> Variant:
    """gw.watch with `kwargs` and fresh `guards()` each run; attention=False removes the
    attention and logit probes (a measurement of their cost only: private API, not a user
    setting)."""

    @contextlib.contextmanager
    def variant(work: Workload, tmp: Path) -> Iterator[Stepper]:
        run_dir = Path(tempfile.mkdtemp(dir=tmp)) / "run"
        with gw.watch(work.model, work.optimizer, run_dir=run_dir, guards=guards(), **kwargs) as w:
            if not attention:
                w._probe_records.attention.detach()
            work.log = w.log  # type: ignore[attr-defined]
            yield Stepper(work)
        del work.log  # type: ignore[attr-defined]

    return variant


def watched_twin_variant(**kwargs: object) -> Variant:
    """gw.watch (with `kwargs`) on a twin of the workload, opened at its first round and kept
    open until the process ends (see the module docstring: --compile)."""
    twins: dict[int, Workload] = {}

    @contextlib.contextmanager
    def variant(work: Workload, tmp: Path) -> Iterator[Stepper]:
        if id(work) not in twins:
            twin = work.twin()
            run_dir = Path(tempfile.mkdtemp(dir=tmp)) / "run"
            twin.log = gw.watch(twin.model, twin.optimizer, run_dir=run_dir, **kwargs).log  # type: ignore[attr-defined]
            twins[id(work)] = twin
        yield Stepper(twins[id(work)])

    return variant


VARIANTS: dict[str, Variant] = {
    "plain": plain,
    "floor: foreach_norm": foreach_norm_floor,
    "floor: clip_grad_norm_": clip_grad_norm_floor,
    "gradwatch defaults": gradwatch_variant(),
    "gradwatch, histograms off": gradwatch_variant(histogram_every=None),
    "gradwatch, probes off": gradwatch_variant(probe_every=None),
}
COMPILED_VARIANTS: dict[str, Variant] = {
    "compiled plain": plain,
    "floor: foreach_norm": foreach_norm_floor,
    "compiled, gradwatch defaults": watched_twin_variant(),
}


@dataclass
class Timing:
    """One variant's measurements: the total time of each round's run (watch(), every step and
    close() with its flush: what a user pays) and every step's time."""

    totals: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)


def run_once(variant: Variant, work: Workload, tmp: Path, steps: int, timing: Timing | None):
    """One run of `steps` steps under `variant`, from its set-up to its close; recorded in
    `timing` (None: a warm-up)."""
    sync = torch.cuda.synchronize if work.inputs.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with variant(work, tmp) as stepper:
        log = getattr(stepper.work, "log", None)
        for _ in range(steps):
            begun = time.perf_counter()
            loss = stepper.work.step(stepper.between)
            if log is not None:
                log(loss=loss)
            if timing is not None:
                sync()
                timing.steps.append(time.perf_counter() - begun)
    sync()
    if timing is not None:
        timing.totals.append(time.perf_counter() - start)


def measure(
    work: Workload, variants: dict[str, Variant], rounds: int, steps: int, tmp: Path
) -> dict[str, Timing | str]:
    """Each variant's `Timing` over `rounds` interleaved rounds (one run of `steps` steps per
    variant and round, the order rotating), after a warm-up run of 3 steps each; for a variant
    that cannot run the workload, its error (it is not tried again)."""
    timings: dict[str, Timing] = {name: Timing() for name in variants}
    failed: dict[str, str] = {}
    names = list(variants)
    for r in range(-1, rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in failed:
                continue
            try:
                warm_up = r < 0
                run_once(
                    variants[name],
                    work,
                    tmp,
                    3 if warm_up else steps,
                    None if warm_up else timings[name],
                )
            except Exception as exc:  # a peer that does not support the workload
                failed[name] = f"fails: {type(exc).__name__}: {str(exc)[:80]}"
        if r >= 0:
            print(f"  {work.name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {name: failed.get(name) or timing for name, timing in timings.items()}


# glibc's dynamic mmap threshold makes the same training step jump between allocation regimes
# (here the CNN's plain step took 16.6 or 21.7 ms depending on what was allocated before, and a
# few small extra allocations could flip it), so by default the benchmark fixes the thresholds:
# the ratios then measure gradwatch, not the allocator. --default-malloc keeps glibc's defaults.
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


_MALLOC_TEXT = " ".join(f"{k}={v}" for k, v in STABLE_MALLOC.items())


def _use_stable_malloc() -> None:
    """Re-run this process with STABLE_MALLOC set (the allocator reads it at start-up)."""
    if any(os.environ.get(k) != v for k, v in STABLE_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC})


def run_benchmark(
    variants: dict[str, Variant],
    name: str,
    description: str,
    compiled_variants: dict[str, Variant] | None = None,
) -> None:
    """Parse the command line, measure `variants` on the workloads (`compiled_variants` with
    --compile), print and write the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's dynamic allocator thresholds (noisier ratios)",
    )
    parser.add_argument("--device", default="cpu")
    if compiled_variants is not None:
        parser.add_argument("--compile", action="store_true", help="torch.compile the forward")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=100, help="steps of each run (one run per variant and round)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(variants) + list(compiled_variants or {}),
        default=None,
        help="time only these variants (the first is the baseline); default: all",
    )
    parser.add_argument("--out", default=None, help="file name under benchmarks/results/")
    args = parser.parse_args()
    compiled = getattr(args, "compile", False)
    if compiled:
        variants = compiled_variants
    args.variants = [v for v in args.variants or variants if v in variants]
    subset = len(args.variants) < len(variants)
    variants = {name: variants[name] for name in args.variants}
    if not args.default_malloc:
        _use_stable_malloc()

    device = torch.device(args.device)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            work = WORKLOADS[workload](device)
            if compiled:
                work.compile()
            results[workload] = measure(work, variants, args.rounds, args.steps, Path(tmp))
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    header = (
        f"# gradwatch {name} ({where}, torch {torch.__version__})\n\n"
        f"Command: `python benchmarks/{name}.py --device {args.device} --rounds {args.rounds} "
        f"--steps {args.steps}{' --default-malloc' if args.default_malloc else ''}"
        f"{' --compile' if compiled else ''}"
        + (" --variants " + " ".join(repr(v) for v in args.variants) if subset else "")
        + "`. "
        + (
            "glibc's default allocator thresholds. "
            if args.default_malloc
            else f"Allocator thresholds fixed ({_MALLOC_TEXT}) so ratios do not jump between "
            "allocation regimes. "
        )
        + f"Each of {args.rounds} interleaved rounds (order rotating) times one whole run of "
        f"{args.steps} steps per variant: set-up, every step (probe steps, histogram steps, "
        "flushes) and close() with its last flush, i.e. what a user pays; after one untimed "
        "warm-up run each. The median step is the typical step. The floors read every gradient "
        "once (foreach_norm) or norm-and-scale them (clip_grad_norm_)."
        + (
            " Compiled: the watched twin is watched once for the whole benchmark (a fresh "
            "watcher per run would recompile), so its close() is not timed."
            if compiled
            else ""
        )
    )
    table = format_table(results, header)
    print(table)
    suffix = ("-default-malloc" if args.default_malloc else "") + ("-compile" if compiled else "")
    write_results(args.out or f"{name}-{device.type}{suffix}.md", table)


def format_table(results: dict[str, dict[str, Timing | str]], header: str) -> str:
    lines = [
        header,
        "",
        "| workload | variant | run total (s), mean ± sd | total vs first variant, mean "
        "[min, max] over rounds | median step (ms) | median step vs first |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload, timings in results.items():
        base = next(iter(timings.values()))
        for name, timing in timings.items():
            if isinstance(timing, str) or isinstance(base, str):
                lines.append(f"| {workload} | {name} | {timing} | | | |")
                continue
            ratios = [t / b for t, b in zip(timing.totals, base.totals, strict=True)]
            spread = statistics.stdev(timing.totals) if len(timing.totals) > 1 else 0.0
            median = statistics.median(timing.steps)
            lines.append(
                f"| {workload} | {name} | {statistics.fmean(timing.totals):.2f} ± {spread:.2f} "
                f"| {statistics.fmean(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] "
                f"| {median * 1e3:.2f} | {median / statistics.median(base.steps):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    run_benchmark(VARIANTS, "overhead", __doc__.split("\n\n")[0], COMPILED_VARIANTS)


if __name__ == "__main__":
    main()
