"""Per-step overhead of each guard on the three benchmark workloads.

Every guarded variant runs gw.watch with probes off and one guard, against plain training and
gw.watch without guards, interleaved in one process (see overhead.py for the method).

    python benchmarks/guards.py   # -> results/guards-cpu.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import (
    clip_grad_norm_floor,
    gradwatch_variant,
    plain,
    run_benchmark,
)

import gradwatch as gw

G = gw.guards
GUARDS = {
    "ClipNorm(1.0)": lambda: [G.ClipNorm(1.0)],
    "ClipValue(0.01)": lambda: [G.ClipValue(0.01)],
    "AGC()": lambda: [G.AGC()],
    "AutoClip(history=1000)": lambda: [G.AutoClip(history=1000)],
    "ZClip()": lambda: [G.ZClip()],
    "SkipNonFinite()": lambda: [G.SkipNonFinite()],
    "Rollback(every=100)": lambda: [G.Rollback(every=100)],
}
VARIANTS = {
    "plain": plain,
    "floor: clip_grad_norm_": clip_grad_norm_floor,
    "gradwatch, no guard": gradwatch_variant(probe_every=None),
    **{
        f"gradwatch + {name}": gradwatch_variant(guards=make, probe_every=None)
        for name, make in GUARDS.items()
    },
}

if __name__ == "__main__":
    run_benchmark(VARIANTS, "guards", __doc__.split("\n\n")[0])
