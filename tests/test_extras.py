"""Optional dependencies: `import gradwatch` imports none, and a missing one is named with the
pip extra that installs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import small_mlp, train_step

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.extras import EXTRAS, optional


def test_import_gradwatch_imports_no_optional_extra():
    code = (
        "import sys, gradwatch, gradwatch.sinks, gradwatch.integrations; "
        f"print([m for m in {sorted(EXTRAS)!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_names_its_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what a missing package looks like
    with pytest.raises(
        ImportError, match=r"the W&B sink needs wandb: pip install 'gradwatch\[wandb\]'"
    ):
        optional("wandb", "the W&B sink")


def test_summary_without_rich_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r"):
        train_step(model, optimizer)
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(["summary", str(tmp_path / "r")]) == 2
    assert "pip install 'gradwatch[report]'" in capsys.readouterr().err
