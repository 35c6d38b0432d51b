"""Distributed training (gloo, 2 processes on the CPU): rank 0's store holds the statistics of the
whole model and the global batch, guards keep the ranks in step, only rank 0 writes.

Each scenario of `distributed_workers.py` runs once per module in 2 real processes, under a hard
timeout; the references are single-process runs on the concatenated global batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_workers import full_parameters, make_attentive, make_model, make_recurrent, train

import gradwatch as gw

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed support"
)
WORKERS = Path(__file__).with_name("distributed_workers.py")
WORLD = 2
TIMEOUT_S = 240
COMPARED = (
    "grad_norm",
    "grad_max",
    "grad_nonfinite",
    "param_norm",
    "update_ratio",
    "global_grad_norm",
    "loss",
    "signal_norm",
    "act_mean",
    "act_std",
    "dead_frac",
    "saturated_frac",
    "act_nonfinite",
)


def launch(scenario: str, out: Path) -> list[dict]:
    """Run `scenario` on WORLD ranks; kill them all if any is still running after TIMEOUT_S."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [out / f"{scenario}-rank{r}.log" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKERS), scenario, str(out), str(r), str(WORLD)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: killed whole on a hang
        )
        for r, log in enumerate(logs)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{scenario}: ranks still running after {TIMEOUT_S} s (a hang?)\n" + _tails(logs)
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail(f"{scenario}: a rank failed\n" + _tails(logs))
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(WORLD)]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch("ddp", out)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, launch("fsdp2", out)


@pytest.fixture(scope="module")
def examples_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    return out, launch("examples", out)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> gw.Run:
    """The reference: one process trains on the concatenated global batches."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(make_model(), run_dir)
    return gw.open_run(run_dir)


def assert_same_statistics(run: gw.Run, reference: gw.Run) -> None:
    assert run.tensors == reference.tensors  # the user's names: no "module." prefix
    assert run.modules == reference.modules
    np.testing.assert_array_equal(run.steps, reference.steps)
    for name in COMPARED:
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, atol=1e-7, err_msg=name
        )
    for name in ("grad_hist", "act_hist"):  # counts of the whole tensors and the global batch
        counts, expected = run.histogram(name)[1], reference.histogram(name)[1]
        np.testing.assert_array_equal(np.isnan(counts), np.isnan(expected))
        assert np.isfinite(expected).any()
        # values on a bin edge may round across it between the two runs: at most 0.1% moves
        assert np.nansum(np.abs(counts - expected)) <= 1e-3 * np.nansum(expected), name


def test_ddp_store_holds_whole_model_and_global_batch_statistics(ddp_run, single_process):
    out, _ = ddp_run
    run = gw.open_run(out / "ddp-rank0")
    assert_same_statistics(run, single_process)
    assert run.meta["distributed"] == {
        "strategy": "ddp",
        "world_size": 2,
        "backend": "gloo",
        "writer_rank": 0,
    }
    # Probe steps carry module statistics of the global batch, not rank 0's half.
    assert np.isfinite(run.series("signal_norm")[run.steps % 2 == 0]).all()


def test_ddp_gradient_through_time_is_the_global_batchs(ddp_run, tmp_path):
    out, _ = ddp_run
    train(make_recurrent(), tmp_path / "single")
    run, reference = gw.open_run(out / "ddp-rnn"), gw.open_run(tmp_path / "single")
    profiles, expected = run.through_time(), reference.through_time()
    assert list(profiles) == ["gru"] and np.isfinite(expected["gru"]).any()
    np.testing.assert_allclose(profiles["gru"], expected["gru"], rtol=1e-5, atol=1e-9)
    for name in ("time_first_to_last", "time_decay", "time_reach"):
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, err_msg=name
        )


def test_ddp_attention_and_logit_statistics_are_the_global_batchs(ddp_run, tmp_path):
    out, _ = ddp_run
    train(make_attentive(), tmp_path / "single")
    run, reference = gw.open_run(out / "ddp-attn"), gw.open_run(tmp_path / "single")
    assert run.attention_modules == reference.attention_modules == [""]
    for name in ("attn_max_logit", "attn_entropy", "logit_lse", "logit_lse_max"):
        expected = reference.series(name)
        assert np.isfinite(expected).any(), name
        np.testing.assert_allclose(run.series(name), expected, rtol=1e-5, err_msg=name)


def test_ddp_noise_scale_from_ranks_equals_two_micro_batches(ddp_run, tmp_path):
    """Each rank's half of the batch is one part (B_small = 4, B_big = 8): the same estimate as
    one process accumulating the two halves."""
    out, _ = ddp_run
    train(make_model(), tmp_path / "single", steps=12, lr=0.0, micro_batches=2, one_batch=True)
    run, reference = gw.open_run(out / "ddp-noise"), gw.open_run(tmp_path / "single")
    noise, expected = run.series("gns_simple"), reference.series("gns_simple")
    # The ranks are parts from step 0 on; micro-batches only once a step has shown them (step 2,
    # the next probe step): the same estimate each step (one batch, lr 0), different warm-ups.
    both = np.isfinite(noise) & np.isfinite(expected)
    assert both.sum() >= 2 and np.isfinite(noise).sum() > both.sum()
    np.testing.assert_allclose(noise[both], expected[both], rtol=1e-5)
    assert (run.series("gns_batch")[run.steps % 2 == 0] == 8).all()


def test_ddp_only_rank_0_writes_and_every_hook_is_removed(ddp_run):
    _, results = ddp_run
    assert [r["own_dir_exists"] for r in results] == [True, False]
    assert [r["hooks_left"] for r in results] == [0, 0]


def test_ddp_nan_in_one_ranks_input_names_module_step_and_rank(ddp_run):
    out, results = ddp_run
    kinds = [(kind, layer, step) for kind, layer, step, _ in results[0]["findings"]]
    assert kinds == [("nonfinite", "0", 2)]
    evidence = results[0]["findings"][0][3]
    assert evidence["rank"] == 1 and evidence["direction"] == "forward"
    (finding,) = gw.open_run(out / "ddp-nan-input").findings
    assert "on rank 1" in finding.message and "batch" in finding.message
    assert results[1]["findings"] == []  # findings live on rank 0, which writes the store


def test_ddp_gradient_accumulation_with_no_sync_counts_optimizer_steps(ddp_run, single_process):
    out, results = ddp_run
    assert [r["accumulate_steps"] for r in results] == [5, 5]
    # Two micro-batches per rank pool into the statistics of the whole global batch.
    assert_same_statistics(gw.open_run(out / "ddp-accumulate"), single_process)


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_store_holds_whole_tensor_statistics(fsdp2_run, single_process, reshard):
    out, results = fsdp2_run
    run = gw.open_run(out / f"fsdp2-reshard{reshard}")
    assert_same_statistics(run, single_process)
    assert run.meta["distributed"]["strategy"] == "fsdp2"
    assert run.meta["model"]["class"] == "Sequential"  # the user's class, not FSDPSequential
    assert run.module_types == single_process.module_types
    assert [r[f"hooks_left_{reshard}"] for r in results] == [0, 0]


def test_fsdp2_clipping_guards_give_the_single_process_parameters(fsdp2_run, tmp_path):
    out, results = fsdp2_run
    guards = [gw.guards.ZClip(warmup=3), gw.guards.ClipNorm(0.5)]
    reference = make_model()
    train(reference, tmp_path / "ref", steps=8, lr=0.5, spike_at=6, guards=guards)
    _assert_parameters_equal(results[0]["clip_params"], full_parameters(reference))
    clipped = {e.step for e in gw.open_run(out / "fsdp2-clip").events if e.kind == "clip"}
    assert clipped == {e.step for e in gw.open_run(tmp_path / "ref").events if e.kind == "clip"}
    assert 6 in clipped  # the spike was clipped, on both ranks alike


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nan_in_one_ranks_gradient_skips_on_every_rank(strategy, request, tmp_path):
    out, results = request.getfixturevalue(f"{strategy}_run")
    assert results[0]["skip_params"] == results[1]["skip_params"]
    assert all(np.isfinite(np.asarray(p)).all() for p in results[1]["skip_params"].values())
    reference = make_model()
    train(reference, tmp_path / "ref", guards=[gw.guards.SkipNonFinite()], poison_grad=(2, 0))
    _assert_parameters_equal(results[0]["skip_params"], full_parameters(reference))
    events = gw.open_run(out / f"{strategy}-skip").events
    assert [(e.kind, e.step) for e in events] == [("skip", 2)]


def test_fsdp2_rollback_restores_every_ranks_shards_together(fsdp2_run, tmp_path):
    out, results = fsdp2_run
    assert results[0]["rollback_params"] == results[1]["rollback_params"]
    reference = make_model()
    train(reference, tmp_path / "ref", steps=6, guards=[gw.guards.Rollback(every=2)],
          poison_grad=(3, 0))  # fmt: skip
    _assert_parameters_equal(results[0]["rollback_params"], full_parameters(reference))
    (event,) = gw.open_run(out / "fsdp2-rollback").events
    assert (event.kind, event.step, event.detail["restored_step"]) == ("rollback", 3, 2)


def test_ranks_may_log_different_scalars(ddp_run):
    """Names logged on some ranks only are gathered with the values: each scalar is the mean
    over the ranks that logged it."""
    out, _ = ddp_run
    run = gw.open_run(out / "ddp-names")
    assert {"rank_value", "only_0", "only_1"} <= set(run.scalar_names)
    np.testing.assert_array_equal(run.series("rank_value"), 0.5)
    np.testing.assert_array_equal(run.series("only_0"), 1.0)
    np.testing.assert_array_equal(run.series("only_1"), 2.0)
    assert len(run.steps) == 5


def test_flushes_of_different_steps_are_refused_on_every_rank():
    """The check each rank makes on the gathered (rows, first step) of the previous flush."""
    from gradwatch.distributed import check_flushed_alike

    check_flushed_alike(np.array([[3.0, 0.0], [3.0, 0.0]]), 3, 0)
    with pytest.raises(RuntimeError, match="ranks flushed different steps"):
        check_flushed_alike(np.array([[3.0, 0.0], [2.0, 0.0]]), 3, 0)


def test_gathered_scalar_names_survive_the_bytes_and_combine_by_name():
    """What the writer does with the gathered scalars (no processes needed): names as bytes,
    a name longer than NAME_BYTES kept whole for this rank's own, norm parts under fsdp2."""
    from gradwatch.distributed import (
        GATHERED_SCALARS,
        combine_gathered_scalars,
        encode_names,
    )

    long = "x" * 300
    own, other = ("global_grad_norm", long, "loss"), ("global_grad_norm", "loss", "b")
    names = np.stack([np.frombuffer(encode_names(n), dtype=np.uint8) for n in (own, other)])
    values = np.full((2, 1, GATHERED_SCALARS), np.nan, dtype=np.float32)
    values[0, 0, :3] = [3.0, 7.0, 1.0]
    values[1, 0, :3] = [4.0, 3.0, 5.0]
    union, data = combine_gathered_scalars(values, names, own, {"global_grad_norm"}, True)
    assert union == ("global_grad_norm", long, "loss", "b")
    np.testing.assert_allclose(data[0], [5.0, 7.0, 2.0, 5.0])  # √(3² + 4²); means otherwise


@pytest.mark.parametrize("strategy", ["ddp_run", "fsdp2_run"])
def test_no_host_sync_in_distributed_steps_and_flushes(strategy, request):
    """Every rank ran every scenario (probes, histograms, recurrent and attention probes, the
    noise scale from ranks, flushes, clipping guards) under the sync sentinel: gradwatch's code
    made no host sync; SkipNonFinite and Rollback decide on the host, on marked lines."""
    _, results = request.getfixturevalue(strategy)
    for rank, result in enumerate(results):
        sites = "\n".join(f"{site}: {what}" for site, what in result["sync_sites"].items())
        assert not sites, f"rank {rank} synced in gradwatch's code:\n{sites}"


def test_ranks_that_disagree_fail_at_watch_on_every_rank(tmp_path):
    results = launch("bad_setup", tmp_path)
    for r in results:
        assert "called differently on ranks [1]" in r["mismatch"]
    assert results[0]["taken"].startswith("FileExistsError: run_dir")
    assert results[1]["taken"].startswith("RuntimeError: gw.watch() failed on other ranks: rank 0")
    for r in results:  # Shard(0) over every rank, like FSDP2, but tensor parallel
        assert (
            "tensor parallelism and other DTensor layouts are not supported" in r["tensor_parallel"]
        )
    assert all(r["writers"] == 0 for r in results)  # no writer thread left by a refusal


def test_report_summary_and_export_show_world_size_and_strategy(ddp_run, tmp_path, capsys):
    out, _ = ddp_run
    page = gw.report(out / "ddp-rank0", tmp_path / "report.html").read_text()
    assert "2 ranks (ddp, gloo)" in page
    from gradwatch.report.summary import print_summary

    print_summary(out / "ddp-rank0")
    assert "2 ranks (ddp, gloo)" in capsys.readouterr().out
    pytest.importorskip("tensorboard")
    from test_report import read_tensorboard

    gw.sinks.export_tensorboard(out / "ddp-rank0", tmp_path / "tb")
    events = read_tensorboard(tmp_path / "tb")
    (text,) = events.Tensors("run/text_summary")
    assert "2 ranks (ddp, gloo)" in text.tensor_proto.string_val[0].decode()


def _assert_parameters_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


EXAMPLE_SERIES = ("pe_norm_p50", "pe_norm_p95", "pe_norm_max")
EXAMPLE_SCALARS = ("pe_examples", "pe_total_p50", "pe_total_max", "pe_total_argmax", "pe_top_share")


@pytest.mark.parametrize(
    ("run_name", "options"),
    [
        ("examples-ddp", {}),
        ("examples-accumulate", {"micro_batches": 2}),
        ("examples-fsdp2", {}),
    ],
)
def test_per_example_norms_are_the_global_batchs(request, tmp_path, run_name, options):
    """Each rank's examples gathered in rank order: the quantiles per tensor, the largest
    example (its index in the global batch), its share and B_simple equal a single process on
    the global batch; with uneven batches (5 and 3) B_simple comes from the global batch's mean
    gradient, not DDP's average of the ranks' means."""
    out, _ = request.getfixturevalue("examples_run")
    run = gw.open_run(out / run_name)
    reference_dir = tmp_path / "single"
    train(make_model(), reference_dir, steps=12, lr=0.0, per_example=True, **options)
    reference = gw.open_run(reference_dir)
    assert run.meta["distributed"]["world_size"] == WORLD
    for name in EXAMPLE_SERIES:
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, atol=1e-7, err_msg=name
        )
    for name in EXAMPLE_SCALARS:
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, atol=1e-7, err_msg=name
        )
    # a ratio of differences of float32 sums taken in another order: 1.3e-5 apart seen
    np.testing.assert_allclose(run.series("gns_simple"), reference.series("gns_simple"), rtol=1e-4)
    assert np.isfinite(reference.series("gns_simple")).sum() >= 2  # past the warm-up
    examples = reference.series("pe_examples")
    assert set(examples[np.isfinite(examples)]) == {8}


def test_per_example_under_distributed_syncs_only_for_the_ranks_batch_sizes(examples_run):
    """The one host sync of per_example under torch.distributed: each probe step reads the
    ranks' batch sizes (to pad the gather) in `ExampleProbes.record`, nowhere else."""
    _, results = examples_run
    for rank, result in enumerate(results):
        sites = result["sync_sites"]
        assert sites, "the sentinel saw no sync: it did not watch these runs"
        assert all("example_probes.py" in site for site in sites), (rank, sites)
