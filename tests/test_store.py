"""The run store: crash safety, live reading from another process, no pickles, clear errors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import small_mlp, train_step

import gradwatch as gw

TRAIN_FOREVER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import gradwatch as gw
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gw.watch(model, optimizer, run_dir=sys.argv[1], flush_every=5, probe_every=3)
    while True:
        loss = model(torch.randn(8, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        w.log(loss=loss)
        time.sleep(0.002)
    """
)


def wait_for_steps(run_dir, n: int, child: subprocess.Popen, timeout: float = 60.0) -> gw.Run:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, child.stderr.read().decode()
        if (run_dir / "run.sqlite").exists():
            run = gw.open_run(run_dir)  # a reader in another process, while the child writes
            if len(run.steps) >= n:
                return run
            run.close()
        time.sleep(0.05)
    raise AssertionError(f"the child did not record {n} steps in {timeout} s")


def test_killed_run_keeps_every_flushed_step_and_reads_live(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_FOREVER, str(run_dir)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        live = wait_for_steps(run_dir, 15, child)
        live_steps = live.steps
        assert live.series("grad_norm").shape == (len(live_steps), 4)
        live.refresh()
        assert len(live.steps) >= len(live_steps)
        live.close()
        time.sleep(0.2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    run = gw.open_run(run_dir)
    steps = run.steps
    assert len(steps) >= 15 and len(steps) % 5 == 0  # whole blocks only
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    assert np.isfinite(run.series("grad_norm")).all()
    assert np.isfinite(run.series("loss")).all()
    assert "closed" not in run.meta


def test_store_holds_json_and_raw_arrays_only(tmp_path):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, optimizer, run_dir=tmp_path / "r", flush_every=2) as w:
        for _ in range(3):
            w.log(loss=train_step(model, optimizer))
    conn = sqlite3.connect(tmp_path / "r" / "run.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for (value,) in conn.execute("SELECT value FROM meta"):
        json.loads(value)
    rows = conn.execute("SELECT n_steps, steps, tensor_stats, tensor_data FROM blocks").fetchall()
    assert [r[0] for r in rows] == [2, 1]  # one row per flushed block, not one per number
    for n, steps, stats, data in rows:
        assert len(zlib.decompress(steps)) == n * 8
        assert (
            len(zlib.decompress(data)) == n * len(w.inventory.tensors) * len(json.loads(stats)) * 4
        )


def test_open_run_on_a_path_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a gradwatch run"):
        gw.open_run(tmp_path)
    (tmp_path / "run.sqlite").write_text("garbage")
    with pytest.raises(ValueError, match="not a readable gradwatch run store"):
        gw.open_run(tmp_path)


def test_run_metadata_describes_model_and_versions(tmp_path):
    model = small_mlp()
    with gw.watch(model, torch.optim.Adam(model.parameters()), run_dir=tmp_path / "r"):
        pass
    meta = gw.open_run(tmp_path / "r").meta
    assert meta["model"]["class"] == "Sequential"
    assert meta["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["optimizer"] == "Adam"
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["config"]["flush_every"] == 50
    assert meta["closed"] is True


def test_every_failed_write_is_reported_and_close_raises_the_first(tmp_path, caplog):
    from gradwatch.run_writer import RunWriter

    writer = RunWriter(tmp_path / "run")
    writer.write_tensors([object()])  # no name, module, shape: the insert fails
    writer.write_meta({"fine": 1})
    writer.write_tensors([object()])
    writer.drain()
    failures = [r.getMessage() for r in caplog.records if "failed (tensors" in r.getMessage()]
    assert len(failures) == 2 and "failure 2" in failures[1]
    with pytest.raises(RuntimeError, match="could not write the run store") as raised:
        writer.close()
    assert isinstance(raised.value.__cause__, AttributeError)
    assert gw.open_run(tmp_path / "run").meta["fine"] == 1  # the writes between went through


def test_run_dir_that_is_a_file_gets_an_error_naming_run_dir(tmp_path):
    """(A file in run_dir's path: test_watcher.py::test_unwritable_run_dir_fails_at_watch.)"""
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"run_dir .* is a file; pass the path"):
        gw.watch(small_mlp(), run_dir=tmp_path / "taken")
