"""Live sinks with the real packages and no network: W&B in offline mode, read back from the
offline run's record file; MLflow with a local file store, read back with its client."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from test_report import train_dead_layer

import gradwatch as gw
from gradwatch.sinks.live import spread


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: a 7-byte header, then
    32 KiB blocks of chunks with a 7-byte header: crc32c, length, type 1 full / 2-4 parts)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(b"".join(parts))
            parts = []


def finished_wandb_records(path: Path, timeout_s: float = 30.0) -> list:
    """The records of an offline run once its service has written the final `exit` record
    (`run.finish()` can return before the wandb service has flushed the file)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except Exception:  # a record still being written does not parse yet
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the offline W&B run {path} had no exit record after {timeout_s} s")
        time.sleep(0.2)


def test_spread_keeps_first_and_last_and_bounds_the_count():
    assert spread(5, 16) == [0, 1, 2, 3, 4]
    chosen = spread(100, 16)
    assert len(chosen) == 16 and chosen[0] == 0 and chosen[-1] == 99


def test_wandb_offline_run_receives_metrics_and_each_finding_once(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="gradwatch-test", dir=str(tmp_path))
    try:
        train_dead_layer(tmp_path / "run", sinks=[gw.sinks.WandB(layers=2)])
    finally:
        run.finish()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, alerts, findings = {}, [], None
    for record in finished_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if "gradwatch/step" in row:
                history[row["gradwatch/step"]] = row
        elif kind == "alert":
            alerts.append(record.alert.title)
        elif kind == "summary":
            for item in record.summary.update:
                if (item.key or "/".join(item.nested_key)) == "gradwatch/findings":
                    findings = json.loads(item.value_json)
    stored = gw.open_run(tmp_path / "run")
    assert sorted(history) == list(stored.steps)
    np.testing.assert_allclose(
        [history[s]["gradwatch/global_grad_norm"] for s in stored.steps],
        stored.series("global_grad_norm"),
        rtol=1e-6,
    )
    # A W&B histogram is stored as nested keys: <metric>/_type, <metric>/bins, <metric>/values.
    per_layer = {
        k.removesuffix("/_type")
        for row in history.values()
        for k in row
        if k.count("/") == 2 or k.endswith("/_type")
    }
    # layers=2: the first and last tensor and module, on probe steps only
    assert per_layer == {
        "gradwatch/grad_norm/stem.weight",
        "gradwatch/grad_norm/head.bias",
        "gradwatch/signal_norm/stem",
        "gradwatch/signal_norm/head",
        "gradwatch/grad_hist/stem.weight",
        "gradwatch/grad_hist/head.bias",
        "gradwatch/act_hist/stem",
        "gradwatch/act_hist/head",
    }
    # The histograms are W&B histograms of the stored counts.
    edges, counts = stored.histogram("grad_hist")
    # at the default schedule, histograms come every tenth probe step: step 0 here
    logged = {k: history[0][f"gradwatch/grad_hist/stem.weight/{k}"] for k in ("_type", "bins")}
    assert logged["_type"] == "histogram"
    assert "gradwatch/grad_hist/stem.weight/_type" not in history[10]
    row = list(stored.steps).index(0)
    values = history[0]["gradwatch/grad_hist/stem.weight/values"]
    np.testing.assert_array_equal(values, counts[row, 0])
    np.testing.assert_allclose(logged["bins"][1:-1], edges[1:-1])
    assert (
        "gradwatch/signal_norm/stem" in history[10]
        and "gradwatch/signal_norm/stem" not in history[11]
    )
    assert alerts == [f"gradwatch: {f.kind} at {f.layer}" for f in stored.findings]
    assert alerts == ["gradwatch: dead_units at hidden"]
    # sent once, as first seen (the stored finding goes on to a later last step)
    assert len(findings) == 1 and findings[0].startswith("[error] dead_units at layer 'hidden'")


def test_mlflow_local_run_receives_metrics_and_each_finding_once(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # A local file store: the tracking client alone (mlflow-skinny) has no database backend, and
    # MLflow 3 asks to opt in to the file store.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())  # whatever ran before set
    with mlflow.start_run() as active:
        train_dead_layer(tmp_path / "run", sinks=[gw.sinks.MLflow()])
    client = mlflow.MlflowClient()
    run_id = active.info.run_id
    stored = gw.open_run(tmp_path / "run")
    history = client.get_metric_history(run_id, "gradwatch/global_grad_norm")
    assert [m.step for m in history] == list(stored.steps)
    np.testing.assert_allclose(
        [m.value for m in history], stored.series("global_grad_norm"), rtol=1e-6
    )
    signal = client.get_metric_history(run_id, "gradwatch/signal_norm/hidden")
    assert [m.step for m in signal] == [s for s in stored.steps if s % 10 == 0]
    tags = client.get_run(run_id).data.tags
    assert "dead_units" in tags["gradwatch.finding.dead_units.hidden"]
    text = mlflow.artifacts.load_text(f"{active.info.artifact_uri}/gradwatch/findings.txt")
    assert text.count("dead_units at layer 'hidden'") == 1


def test_sinks_without_an_active_run_say_what_to_do():
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    with pytest.raises(ValueError, match=r"call wandb.init\(\) before gw.watch\(\)"):
        gw.sinks.WandB()
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match=r"call mlflow.start_run\(\) before gw.watch\(\)"):
        gw.sinks.MLflow()
