"""Under CI (`CI=true`, as `.ci/run` runs), a skipped test fails: CI must not pass by skipping
what it claims to run (a missing extra, a broken import, a browser that did not install). Tests
marked `cuda` may skip there: CI has no GPU. Imported by conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _fail(report: Any, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI ({reason}); only tests marked cuda may skip there"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (the only tests CI may skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _under_ci() and item.get_closest_marker("cuda") is None:
        _fail(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _under_ci():  # a module-level importorskip
        _fail(report, "module")
