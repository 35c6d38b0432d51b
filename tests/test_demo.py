"""`gradwatch demo`: the three scenarios find what they are built to show."""

from __future__ import annotations

from gradwatch.cli import main
from gradwatch.demo import SCENARIOS, run_demo

PROBLEMS = {"vanishing", "exploding", "dead_units", "saturation"}


def test_demo_finds_vanishing_exploding_and_a_healthy_repair(tmp_path):
    outcomes = {o.scenario.name: o for o in run_demo(tmp_path, steps=300)}
    assert set(outcomes) == {s.name for s in SCENARIOS}
    assert "vanishing" in {f.kind for f in outcomes["vanishing"].findings}
    assert "exploding" in {f.kind for f in outcomes["exploding"].findings}
    repaired = outcomes["repaired"]
    assert not {f.kind for f in repaired.findings} & PROBLEMS
    assert repaired.test_accuracy > 0.9
    assert outcomes["vanishing"].test_accuracy < 0.5  # it really does not learn


def test_cli_demo_prints_findings_and_run_stores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "vanishing at layer '0'" in out
    assert str(tmp_path / "repaired") in out
