"""`ReportData`: what the report, the charts and the summary read from a run store, read once."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from gradwatch.detect.findings import FINDING_KINDS, Finding
from gradwatch.guards.base import Event
from gradwatch.run_reader import Run
from gradwatch.stats.attention import LOGIT_SCALARS
from gradwatch.stats.example_probes import EXAMPLE_SCALARS
from gradwatch.stats.inputs import INPUT_SCALARS
from gradwatch.stats.noise_scale import NOISE_SCALARS

# Scalars gradwatch records itself: drawn in charts of their own, not as "logged scalars".
OWN_SCALARS = frozenset(
    ("global_grad_norm", *LOGIT_SCALARS, *INPUT_SCALARS, *NOISE_SCALARS, *EXAMPLE_SCALARS)
)


def processes_line(meta: dict) -> str:
    """How the run was spread: "1 process", or "2 ranks (ddp, gloo)"."""
    spread = meta.get("distributed") or {}
    if spread.get("world_size", 1) <= 1:
        return "1 process"
    return f"{spread['world_size']} ranks ({spread['strategy']}, {spread['backend']})"


class ReportData:
    """A snapshot of a run for reporting: series are read on first use and kept."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run = Run(run_dir)
        self.path = Path(run_dir)
        self._series: dict[str, np.ndarray] = {}

    @cached_property
    def meta(self) -> dict:
        return self.run.meta

    @cached_property
    def steps(self) -> np.ndarray:
        return self.run.steps

    @cached_property
    def tensors(self) -> list[dict]:
        return self.run.tensor_info

    @cached_property
    def modules(self) -> list[str]:
        return self.run.modules

    @cached_property
    def module_types(self) -> list[str]:
        return self.run.module_types

    @cached_property
    def findings(self) -> list[Finding]:
        return self.run.findings

    @cached_property
    def events(self) -> list[Event]:
        return self.run.events

    @cached_property
    def grad_hist(self) -> tuple[np.ndarray, np.ndarray]:
        return self.run.histogram("grad_hist")

    @cached_property
    def through_time(self) -> dict[str, np.ndarray]:
        return self.run.through_time()

    @cached_property
    def scalar_names(self) -> list[str]:
        return self.run.scalar_names

    def series(self, name: str) -> np.ndarray | None:
        """The series, or None when the run never recorded it."""
        if name not in self._series:
            try:
                self._series[name] = self.run.series(name)
            except KeyError:
                return None
        return self._series[name]

    @property
    def user_scalars(self) -> list[str]:
        """Scalars logged with w.log: not gradwatch's own (`OWN_SCALARS`), nor the guards'
        (they carry a dot: "ZClip.norm")."""
        return [n for n in self.scalar_names if n not in OWN_SCALARS and "." not in n]

    @cached_property
    def weight_columns(self) -> list[int]:
        """Tensors with 2 or more dimensions (weights), or all tensors if there are none."""
        weights = [i for i, t in enumerate(self.tensors) if len(t["shape"]) >= 2]
        return weights or list(range(len(self.tensors)))

    @property
    def verdict(self) -> tuple[str, str]:
        """(state, sentence): state is "empty", "problems" or "healthy"."""
        if len(self.steps) == 0:
            return (
                "empty",
                "No data yet: this run has not flushed a step (it is starting, or "
                "it stopped before its first flush).",
            )
        problems = self.findings  # every finding kind names a problem
        if problems:
            kinds = sorted({f.kind for f in problems}, key=FINDING_KINDS.index)
            return (
                "problems",
                f"Problems found: {', '.join(kinds)} "
                f"({len(problems)} finding{'s' * (len(problems) != 1)}).",
            )
        return ("healthy", "Healthy: no gradient problem was found.")

    @property
    def processes(self) -> str:
        return processes_line(self.meta)

    @property
    def completeness(self) -> str:
        if self.meta.get("closed"):
            return f"Complete run: {len(self.steps)} recorded steps, {self.processes}."
        return (
            f"Incomplete run: it was not closed (still running, or killed); this shows the "
            f"{len(self.steps)} steps flushed so far ({self.processes})."
        )

    def close(self) -> None:
        self.run.close()
