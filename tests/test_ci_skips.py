"""The CI hook (`ci_skips.py`): under CI=true a skip fails the run, a cuda-marked one may skip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SKIPS = """
import pytest

def test_needs_an_extra():
    pytest.importorskip("a_package_that_is_not_installed")

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="no CUDA device")
def test_needs_cuda():
    pass

def test_runs():
    assert True
"""
MODULE_SKIP = """
import pytest
pytest.importorskip("another_missing_package")

def test_never_collected():
    pass
"""


def run_pytest(tmp_path: Path, source: str, ci: str) -> subprocess.CompletedProcess:
    """pytest over one test file, with the CI hook installed as tests/conftest.py installs it."""
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from ci_skips import pytest_configure, pytest_make_collect_report, "
        "pytest_runtest_makereport\n"
    )
    (tmp_path / "test_it.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "CI": ci}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_under_ci_a_skip_fails_the_run_but_a_cuda_skip_does_not(tmp_path):
    done = run_pytest(tmp_path, SKIPS, "true")
    assert done.returncode == 1, done.stdout
    assert "test skipped under CI" in done.stdout
    assert "1 failed, 1 passed, 1 skipped" in done.stdout  # the cuda test may skip


def test_under_ci_a_module_that_skips_fails_the_run(tmp_path):
    done = run_pytest(tmp_path, MODULE_SKIP, "true")
    assert done.returncode != 0 and "module skipped under CI" in done.stdout, done.stdout


@pytest.mark.parametrize("source", [SKIPS, MODULE_SKIP], ids=["tests", "module"])
def test_off_ci_skips_stay_skips(tmp_path, source):
    done = run_pytest(tmp_path, source, "")
    assert "skipped" in done.stdout and "failed" not in done.stdout and "error" not in done.stdout
