"""The `Sink` protocol: where statistics go besides the run store."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gradwatch.detect.findings import Finding
from gradwatch.stats.buffer import StatsBlock


@runtime_checkable
class Sink(Protocol):
    """Receives blocks and findings in the writer thread (never in the training step).

    `tensors` and `modules` name the columns of the block's per-tensor and per-module arrays.
    """

    def write_block(self, block: StatsBlock, tensors: list[str], modules: list[str]) -> None: ...

    def write_findings(self, findings: list[Finding]) -> None: ...

    def close(self) -> None: ...
