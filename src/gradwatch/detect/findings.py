"""`Finding`: one diagnosed problem, with its layer, steps, evidence and remedy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINDING_KINDS: tuple[str, ...] = (
    "vanishing",
    "exploding",
    "nonfinite",
    "dead_units",
    "saturation",
    "spike",
    "underflow",
    "batch_size",
    "outlier_examples",
    "attention_logit_growth",
    "logit_divergence",
    "adam_epsilon",
    "stale_gradients",
    "no_gradient",
    "not_updated",
    "probabilities_as_logits",
    "clip_always",
    "learning_rate",
    "input_scale",
    "batchnorm_small_batch",
    "symmetric_weights",
)
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem found in the gradients of a run.

    `layer` is the module's qualified name from `model.named_modules()` ("" for the whole model);
    `step` is the optimizer step (0-based) where the problem first appeared and `last_step` the last
    step it was seen at. `evidence` holds the numbers the finding rests on (JSON-serialisable).
    """

    kind: str
    layer: str
    step: int
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedy: str = ""
    last_step: int | None = None

    def __str__(self) -> str:
        where = f"layer {self.layer!r}" if self.layer else "model"
        steps = f"step {self.step}"
        if self.last_step is not None and self.last_step != self.step:
            steps = f"steps {self.step}-{self.last_step}"
        text = f"[{self.severity}] {self.kind} at {where}, {steps}: {self.message}"
        return f"{text}\n  remedy: {self.remedy}" if self.remedy else text
