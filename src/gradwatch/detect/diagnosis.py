"""`Diagnosis`: runs every rule on each flushed block and keeps one finding per cause."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from gradwatch.detect.findings import SEVERITIES, Finding
from gradwatch.detect.layout import ModelLayout
from gradwatch.detect.rules import RULES, Memory
from gradwatch.stats.buffer import StatsBlock

logger = logging.getLogger("gradwatch")


class Diagnosis:
    """Applies `RULES` to blocks in order and de-duplicates their findings.

    One finding per (kind, layer): a cause seen again keeps its first step, extends `last_step`
    and takes the newest numbers. `publish` receives the findings that changed with each block.
    """

    def __init__(self, layout: ModelLayout, publish: Callable[[list[Finding]], None]) -> None:
        self.layout = layout
        self._publish = publish
        self._memory: dict[str, Memory] = {rule.__name__: {} for rule in RULES}
        self._findings: dict[tuple[str, str], Finding] = {}
        self._lock = threading.Lock()
        self._failed: set[str] = set()

    def __call__(self, block: StatsBlock) -> None:
        changed = []
        for rule in RULES:
            try:
                found = rule(block, self.layout, self._memory[rule.__name__])
            except Exception:  # one broken detector must not silence the others
                if rule.__name__ not in self._failed:
                    self._failed.add(rule.__name__)
                    logger.exception(
                        "gradwatch: the %s detector failed on the block at step %d; it is "
                        "skipped there, the other detectors go on (reported once)",
                        rule.__name__,
                        int(block.steps[0]),
                    )
                continue
            changed.extend(self._merge(finding) for finding in found)
        if changed:
            self._publish(changed)

    def findings(self) -> list[Finding]:
        with self._lock:
            return sorted(self._findings.values(), key=lambda f: (f.step, f.kind, f.layer))

    def _merge(self, new: Finding) -> Finding:
        key = (new.kind, new.layer)
        with self._lock:
            old = self._findings.get(key)
            if old is not None:
                new = dataclasses.replace(
                    new,
                    step=old.step,
                    last_step=max(old.last_step or old.step, new.last_step or new.step),
                    severity=max(old.severity, new.severity, key=SEVERITIES.index),
                )
            self._findings[key] = new
        return new
