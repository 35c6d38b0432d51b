"""`gw.sinks.Logger`: each finding once, as a warning on a `logging.Logger` (a framework's own
log: the Hugging Face Trainer's, Lightning's)."""

from __future__ import annotations

import logging

from gradwatch.detect.findings import Finding
from gradwatch.sinks.live import LiveMetrics
from gradwatch.stats.buffer import StatsBlock


class Logger:
    """Writes each finding once (per kind and layer, as first seen) to `logger` at WARNING (ERROR
    for findings of severity error), from gradwatch's writer thread. Statistics are not logged."""

    def __init__(self, logger: logging.Logger | str) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._sent = LiveMetrics()

    def write_block(self, block: StatsBlock, tensors: list[str], modules: list[str]) -> None:
        return None

    def write_findings(self, findings: list[Finding]) -> None:
        for finding in self._sent.new_findings(findings):
            level = logging.ERROR if finding.severity == "error" else logging.WARNING
            self.logger.log(level, "gradwatch finding: %s", finding)

    def close(self) -> None:
        return None
