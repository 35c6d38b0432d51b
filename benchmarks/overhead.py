"""Step-time overhead of gradwatch on the three benchmark workloads, against the floors.

Variants run interleaved in one process (their order rotates each round), each round timing
`--steps` consecutive steps per variant; the table gives the median step time and its ratio to
plain training, and the mean step time's ratio: the median is a typical step (with probe_every=10
nine steps in ten are not probe steps), the mean also carries the probe steps' and flushes' extra
cost spread over all steps (and more of the machine's noise). The floors are what any gradient
monitor must pay: one `torch._foreach_norm` over all gradients, and `clip_grad_norm_` (a norm pass
plus a scaling pass), as the core issue asks.

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
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
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
    module_hooks: bool = True,
    attention: bool = True,
    guards: Callable[[], list] = list,
    **kwargs: object,
) -> Variant:
    """gw.watch with `kwargs` and fresh `guards()` each round; module_hooks=False removes the
    forward hooks that flag non-finite outputs, attention=False the attention and logit probes
    (measurements of their cost only: private API, not user settings)."""

    @contextlib.contextmanager
    def variant(work: Workload, tmp: Path) -> Iterator[Stepper]:
        run_dir = Path(tempfile.mkdtemp(dir=tmp)) / "run"
        with gw.watch(work.model, work.optimizer, run_dir=run_dir, guards=guards(), **kwargs) as w:
            if not module_hooks:
                w._module_probes.detach()
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
    "gradwatch grad stats only (no module hooks)": gradwatch_variant(False, probe_every=None),
    "gradwatch stats + non-finite flags (probe_every=None)": gradwatch_variant(probe_every=None),
    "gradwatch default (probe_every=10)": gradwatch_variant(),
}
COMPILED_VARIANTS: dict[str, Variant] = {
    "compiled plain": plain,
    "floor: foreach_norm": foreach_norm_floor,
    "compiled, gradwatch default (probe_every=10)": watched_twin_variant(),
}


def time_steps(stepper: Stepper, steps: int) -> list[float]:
    work, between = stepper.work, stepper.between
    sync = torch.cuda.synchronize if work.inputs.is_cuda else (lambda: None)
    log = getattr(work, "log", None)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = work.step(between)
        if log is not None:
            log(loss=loss)
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure(
    work: Workload, variants: dict[str, Variant], rounds: int, steps: int, tmp: Path
) -> dict[str, tuple[float, float] | str]:
    """(median, mean) step time (s) of each variant over `rounds` interleaved rounds of `steps`
    steps; for a variant that cannot run the workload, its error (it is not tried again)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    failed: dict[str, str] = {}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in failed:
                continue
            try:
                with variants[name](work, tmp) as stepper:
                    time_steps(stepper, 3)  # warm-up, untimed
                    samples[name] += time_steps(stepper, steps)
            except Exception as exc:  # a peer that does not support the workload
                failed[name] = f"fails: {type(exc).__name__}: {str(exc)[:80]}"
        print(f"  {work.name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {
        name: failed.get(name) or (statistics.median(ts), statistics.fmean(ts))
        for name, ts in samples.items()
    }


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
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and round")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(variants) + list(compiled_variants or {}),
        default=None,
        help="time only these variants (the first is the baseline); default: all",
    )
    parser.add_argument("--out", type=Path, default=None)
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
        + f"Medians (and means) of per-step times over {args.rounds} interleaved rounds "
        f"of {args.steps} steps per variant (order rotating each round); the floors read every "
        "gradient once (foreach_norm) or norm-and-scale them (clip_grad_norm_). flush_every=50, "
        "so rounds include flushes."
    )
    table = format_table(results, header)
    print(table)
    suffix = ("-default-malloc" if args.default_malloc else "") + ("-compile" if compiled else "")
    out = args.out or Path(__file__).parent / "results" / f"{name}-{device.type}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)


def format_table(results: dict[str, dict[str, tuple[float, float] | str]], header: str) -> str:
    lines = [
        header,
        "",
        "| workload | variant | median step (ms) | ratio to the first variant | mean step, ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for workload, times in results.items():
        base_median, base_mean = next(iter(times.values()))
        for name, measured in times.items():
            if isinstance(measured, str):
                lines.append(f"| {workload} | {name} | {measured} | | |")
                continue
            median, mean = measured
            lines.append(
                f"| {workload} | {name} | {median * 1e3:.2f} | {median / base_median:.3f} "
                f"| {mean / base_mean:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    run_benchmark(VARIANTS, "overhead", __doc__.split("\n\n")[0], COMPILED_VARIANTS)


if __name__ == "__main__":
    main()
