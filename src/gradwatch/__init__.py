"""gradwatch: see and guard the gradients of deep-network training.

Public API: `watch`, `Watcher`, `WatchConfig`, `open_run`, `Run`, `Finding`, `Event`, `guards`,
`gradcheck`, `per_example_grad_norms`, `report`, `sinks`.
"""

from __future__ import annotations

from gradwatch import guards, sinks
from gradwatch.config import WatchConfig
from gradwatch.detect.findings import Finding
from gradwatch.gradcheck import gradcheck
from gradwatch.gradcheck_report import GradcheckReport, GradcheckRow
from gradwatch.guards.base import Event
from gradwatch.report.html import report
from gradwatch.run_reader import Run, open_run
from gradwatch.stats.per_example import PerExampleNorms, per_example_grad_norms
from gradwatch.version import __version__
from gradwatch.watcher import Watcher, watch

__all__ = [
    "Event",
    "Finding",
    "GradcheckReport",
    "GradcheckRow",
    "PerExampleNorms",
    "Run",
    "WatchConfig",
    "Watcher",
    "__version__",
    "gradcheck",
    "guards",
    "open_run",
    "per_example_grad_norms",
    "report",
    "sinks",
    "watch",
]
