"""Reports: the HTML page, PNG charts, terminal summary and TensorBoard export of a run store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store import TRAIN_FOREVER, wait_for_steps
from torch import nn

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.report.charts import CHARTS
from gradwatch.report.data import ReportData

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

EVIL = "<script>alert(1)</script>"


def train_dead_layer(run_dir, steps=60, name="hidden", **watch_kwargs):
    """A small net whose layer `name` (bias -10 before a ReLU) has dead units."""
    model = nn.Sequential()
    model.add_module("stem", nn.Linear(6, 16))
    model.add_module("act0", nn.ReLU())
    model.add_module(name, nn.Linear(16, 16))
    model.add_module("act1", nn.ReLU())
    model.add_module("head", nn.Linear(16, 3))
    with torch.no_grad():
        getattr(model, name).bias.fill_(-10.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, optimizer, run_dir=run_dir, flush_every=20, **watch_kwargs) as w:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(
                model(torch.randn(16, 6)), torch.randint(0, 3, (16,))
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
    return w


def test_report_has_verdict_findings_every_chart_and_nothing_external(tmp_path):
    train_dead_layer(tmp_path / "run")
    page_path = gw.report(tmp_path / "run", tmp_path / "report.html")
    page = page_path.read_text()
    assert "Problems found: dead_units" in page
    assert "dead_units at layer <code>hidden</code>" in page
    assert "What to do:" in page
    for chart_id in CHARTS:
        assert f'id="chart-{chart_id}"><figcaption>' in page  # drawn, not "not recorded"
    assert page.count("data:image/png;base64,") == len(CHARTS)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "Complete run: 60 recorded steps, 1 process." in page


def test_names_are_escaped(tmp_path):
    train_dead_layer(tmp_path / "run", name=EVIL)
    page = gw.report(tmp_path / "run", tmp_path / "report.html").read_text()
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_empty_partial_and_live_runs_say_so(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, optimizer, run_dir=tmp_path / "live", flush_every=5)
    empty = gw.report(tmp_path / "live", tmp_path / "empty.html").read_text()
    assert "No data yet" in empty
    for _ in range(7):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    w.flush()
    w._writer.drain()
    live = gw.report(tmp_path / "live", tmp_path / "live.html").read_text()
    assert "Incomplete run" in live and "7 steps flushed so far" in live
    w.close()
    done = gw.report(tmp_path / "live", tmp_path / "done.html").read_text()
    assert "Complete run: 7 recorded steps, 1 process." in done


def test_a_killed_run_still_gets_a_report(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_FOREVER, str(run_dir)], stderr=subprocess.PIPE
    )
    try:
        wait_for_steps(run_dir, 10, child).close()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    page = gw.report(run_dir, tmp_path / "killed.html").read_text()
    assert "Incomplete run" in page
    assert page.count("data:image/png;base64,") >= 4


def test_cli_report_png_and_one_line_errors(tmp_path, capsys):
    train_dead_layer(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--png", str(tmp_path / "png")]) == 0
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == sorted(f"{chart_id}.png" for chart_id in CHARTS)
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in written)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file()
    capsys.readouterr()
    for command in (["report", str(tmp_path)], ["summary", str(tmp_path / "nope")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a gradwatch run" in err
        assert "Traceback" not in err


def test_cli_lets_a_bug_keep_its_traceback(tmp_path, monkeypatch):
    """A ValueError from gradwatch's own code is a bug, not a usage error (exit 2, one line)."""
    from gradwatch.report import summary

    train_dead_layer(tmp_path / "run", steps=5)

    def broken(run_dir):
        raise ValueError("a bug inside the summary")

    monkeypatch.setattr(summary, "print_summary", broken)
    with pytest.raises(ValueError, match="a bug inside the summary"):
        main(["summary", str(tmp_path / "run")])


def test_summary_prints_verdict_findings_and_worst_layers(tmp_path, capsys):
    train_dead_layer(tmp_path / "run")
    assert main(["summary", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Problems found: dead_units" in out
    assert "dead_units at 'hidden'" in out
    assert "hidden.weight" in out and "gradient is 0" in out  # the dead layer leads the worst


def read_tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_export_reads_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard")
    train_dead_layer(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    events = read_tensorboard(tmp_path / "tb")
    run = gw.open_run(tmp_path / "run")
    loss = [e.value for e in events.Scalars("scalars/loss")]
    np.testing.assert_allclose(loss, run.series("loss"), rtol=1e-6)
    column = run.tensors.index("hidden.weight")
    grad = events.Scalars("grad/grad_norm/hidden.weight")
    np.testing.assert_allclose(
        [e.value for e in grad], run.series("grad_norm")[:, column], rtol=1e-6
    )
    assert "module/dead_frac/act1" in events.Tags()["scalars"]
    assert "findings/text_summary" in events.Tags()["tensors"]


def test_live_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard")
    train_dead_layer(tmp_path / "run", sinks=[gw.sinks.TensorBoard(tmp_path / "tb")])
    events = read_tensorboard(tmp_path / "tb")
    assert len(events.Scalars("scalars/global_grad_norm")) == 60
    assert "findings/text_summary" in events.Tags()["tensors"]


def test_report_of_a_large_run_stays_small(tmp_path):
    # 200 tensors x 5000 steps, synthetic: the page size must not grow with the run
    from synthetic_run import synthetic_run

    synthetic_run(tmp_path / "big", tensors=200, steps=5000)
    start = time.perf_counter()
    page = gw.report(tmp_path / "big", tmp_path / "big.html")
    assert page.stat().st_size < 3_000_000, time.perf_counter() - start


def test_logged_scalars_are_the_users_not_gradwatchs_own(tmp_path):
    """gradwatch's probe-step scalars (logits, inputs, per-example norms, noise scale) have
    charts of their own: the "logged scalars" chart keeps room for the loss."""
    train_dead_layer(tmp_path / "run", steps=25, per_example=True)
    data = ReportData(tmp_path / "run")
    assert {"logit_lse", "input_rms_max", "pe_total_max", "gns_batch"} <= set(data.scalar_names)
    assert data.user_scalars == ["loss"]


# ---- no chart is an empty frame ------------------------------------------------------------
def drawn(ax) -> int:
    """How many data elements a matplotlib Axes shows: line points that are visible (a marker,
    or a finite neighbour to join), bars of non-zero height, scatter and band vertices, image
    cells, and sentences written on it. Frames, grids, ticks and legends do not count."""
    count = 0
    for line in ax.get_lines():
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        finite = np.isfinite(x) & np.isfinite(y)
        if line.get_marker() not in (None, "None", "", " "):
            count += int(finite.sum())
        else:
            count += int((finite[1:] & finite[:-1]).sum())
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=float).reshape(-1, 2)
        paths = [p.vertices for p in collection.get_paths()]
        vertices = np.concatenate([offsets, *paths]) if paths else offsets
        array = collection.get_array()
        count += int(np.isfinite(vertices).all(axis=1).sum())
        count += 0 if array is None else int(np.isfinite(np.asarray(array, dtype=float)).sum())
    count += sum(1 for patch in ax.patches if getattr(patch, "get_height", lambda: 0)() > 0)
    count += sum(int(np.isfinite(np.asarray(i.get_array(), dtype=float)).sum()) for i in ax.images)
    return count + len(ax.texts)


def test_no_chart_of_the_demo_runs_has_an_empty_panel(tmp_path):
    """Each chart of the demo's three runs draws something in every panel or is replaced by a
    sentence; a scalar logged every 10 steps is drawn as points."""
    import matplotlib.pyplot as plt

    from gradwatch.demo import run_demo
    from gradwatch.report.charts import OPTIONAL_CHARTS

    runs = [o.run_dir for o in run_demo(tmp_path / "demo", steps=60)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gw.watch(model, optimizer, run_dir=tmp_path / "sparse") as w:
        for step in range(40):
            loss = model(torch.randn(16, 8)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                w.log(accuracy=0.5 + step / 100)
            w.log(diverged=float("nan"))  # never finite: the panel says so
    runs.append(tmp_path / "sparse")
    for run_dir in runs:
        data = ReportData(run_dir)
        for chart_id, (_, draw) in {**CHARTS, **OPTIONAL_CHARTS}.items():
            figure = draw(data)
            if figure is None or isinstance(figure, str):
                assert chart_id in OPTIONAL_CHARTS or figure, (run_dir, chart_id)
                continue
            for ax in figure.axes:
                assert drawn(ax) > 0, (run_dir.name, chart_id, ax.get_title(), ax.get_ylabel())
            plt.close(figure)
        data.close()
