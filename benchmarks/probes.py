"""What a probe step costs, with and without the histograms, on the three benchmark workloads.

Every step is a probe step here (probe_every=1), so the medians are probe steps: plain training,
gw.watch without probes, probes without histograms (also without the attention and logit probes
of `stats/attention.py`, to show their share), probes with the histograms (grad_hist and
act_hist) every probe step, interleaved in one process (see overhead.py for the method). With the
defaults (probe_every=10, histogram_every=10) a step pays on average a tenth of the probe step's
extra and a hundredth of the histograms'.

    python benchmarks/probes.py   # -> results/probes-cpu.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import gradwatch_variant, plain, run_benchmark

VARIANTS = {
    "plain": plain,
    "gradwatch, no probes": gradwatch_variant(probe_every=None),
    "probe step, no histograms, no attention probes": gradwatch_variant(
        probe_every=1, histogram_every=None, attention=False
    ),
    "probe step, no histograms": gradwatch_variant(probe_every=1, histogram_every=None),
    "probe step with histograms": gradwatch_variant(probe_every=1, histogram_every=1),
}

if __name__ == "__main__":
    run_benchmark(VARIANTS, "probes", __doc__.split("\n\n")[0])
