"""The detectors, in the order they run on each block (`RULES`): one function per finding kind, from
a statistics block to findings, each in the module of its theme (depth, nonfinite, activations,
spikes, precision, examples, instabilities, wiring, recipe, through_time).

Every rule has the signature `rule(block, layout, memory) -> list[Finding]`; `memory` is a dict the
rule keeps across the blocks of one run (running windows, streaks). Rules run in the writer thread
on host arrays, never in the training step. Thresholds are module constants, named and documented.
"""

from __future__ import annotations

from gradwatch.detect.activations import dead_units, saturation
from gradwatch.detect.depth import exploding, vanishing
from gradwatch.detect.examples import batch_size, outlier_examples
from gradwatch.detect.instabilities import adam_epsilon, attention_logit_growth, logit_divergence
from gradwatch.detect.nonfinite import nonfinite
from gradwatch.detect.precision import underflow
from gradwatch.detect.recipe import (
    batchnorm_small_batch,
    clip_always,
    input_scale,
    learning_rate,
    probabilities_as_logits,
)
from gradwatch.detect.spikes import spike
from gradwatch.detect.streaks import Memory
from gradwatch.detect.symmetry import symmetric_weights
from gradwatch.detect.through_time import exploding_through_time, vanishing_through_time
from gradwatch.detect.wiring import no_gradient, not_updated, stale_gradients

__all__ = ["RULES", "Memory"]

RULES = (
    vanishing,
    exploding,
    vanishing_through_time,
    exploding_through_time,
    nonfinite,
    dead_units,
    saturation,
    spike,
    underflow,
    batch_size,
    outlier_examples,
    attention_logit_growth,
    logit_divergence,
    adam_epsilon,
    stale_gradients,
    no_gradient,
    not_updated,
    probabilities_as_logits,
    clip_always,
    learning_rate,
    input_scale,
    batchnorm_small_batch,
    symmetric_weights,
)
