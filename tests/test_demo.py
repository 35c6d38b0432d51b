"""`gradwatch demo`: the three scenarios find what they are built to show."""

from __future__ import annotations

from gradwatch.cli import main
from gradwatch.demo import SCENARIOS, run_demo


def test_demo_finds_vanishing_exploding_and_a_healthy_repair(tmp_path):
    outcomes = {o.scenario.name: o for o in run_demo(tmp_path, steps=300)}
    assert set(outcomes) == {s.name for s in SCENARIOS}
    # Only the cause: the early layers' weights stay unchanged because their gradient vanished,
    # not because of the learning rate or a parameter left out of the optimizer.
    assert {f.kind for f in outcomes["vanishing"].findings} == {"vanishing"}
    assert "exploding" in {f.kind for f in outcomes["exploding"].findings}
    repaired = outcomes["repaired"]
    # Standardised digits: pixel columns that are almost always 0 keep a tiny RMS in most
    # batches, yet the data is normalised; nothing may be raised on the healthy run.
    assert repaired.findings == []
    assert repaired.test_accuracy > 0.9
    assert outcomes["vanishing"].test_accuracy < 0.5  # it really does not learn


def test_cli_demo_prints_findings_and_run_stores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "vanishing at layer '0'" in out
    assert str(tmp_path / "repaired") in out
