"""torch.compile: a compiled model is watched with the same statistics as eager, without
recompiles after warm-up, without graph breaks of gradwatch's making, and without dynamo warnings.

Most tests compile with the `aot_eager` backend: guards, recompiles and graph breaks are dynamo's
decisions, the same for every backend, and inductor's C++ compile takes tens of seconds per graph
on 2 cores. One test runs the default backend (inductor) end to end.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import gradwatch as gw
from gradwatch.stats.flow import MODULE_STATS, ProbeMode
from gradwatch.stats.grads import TENSOR_STATS

STEPS = 60
WARM_UP = 30


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 32)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(32, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    if kind in ("mlp", "sequential"):
        return [
            (
                torch.randn(32, 6, generator=generator),
                torch.randint(0, 3, (32,), generator=generator),
            )
            for _ in range(STEPS)
        ]
    tokens = [torch.randint(0, 50, (4, 12), generator=generator) for _ in range(STEPS)]
    return [(t, t.flatten()) for t in tokens]


def make(kind: str) -> nn.Module:
    """A user-defined MLP, the same layers as an nn.Sequential of torch.nn modules only (whose
    forward dynamo does not trace under model.compile()), or a small transformer."""
    torch.manual_seed(0)
    if kind == "sequential":
        return nn.Sequential(
            nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
        )
    return MLP() if kind == "mlp" else TinyTransformer()


def train(
    kind: str,
    run_dir,
    compile_as: str | None,
    backend: str = "aot_eager",
    steps=STEPS,
    per_example: bool = False,
):
    """Train under gw.watch (probe steps every 5); returns the run and the number of graphs dynamo
    had compiled after each step. compile_as: None (eager), "wrap" (torch.compile(model)) or
    "method" (model.compile())."""
    dynamo.reset()
    counters.clear()
    model = make(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = model
    if compile_as == "wrap":
        forward = torch.compile(model, backend=backend)
    elif compile_as == "method":
        model.compile(backend=backend)
    graphs = []
    # histograms on every probe step: the default (every tenth) adds one graph, see below
    with gw.watch(
        forward,
        optimizer,
        run_dir=run_dir,
        probe_every=5,
        flush_every=20,
        histogram_every=1,
        per_example=per_example,
    ) as w:
        hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
        for x, y in batches(kind)[:steps]:
            loss = nn.functional.cross_entropy(forward(x).flatten(0, -2), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
            graphs.append(counters["stats"]["unique_graphs"])
    # gradwatch's hooks run inlined in a compiled forward or eagerly, never as frames of their own
    assert all(not _debug_get_cache_entry_list(h.__code__) for h in hooks)
    return gw.open_run(run_dir), graphs


def assert_same_run(run: gw.Run, reference: gw.Run) -> None:
    assert run.tensors == reference.tensors  # no "_orig_mod." prefix
    assert run.modules == reference.modules
    for name in (*TENSOR_STATS, *MODULE_STATS, "global_grad_norm", "loss"):
        np.testing.assert_allclose(
            run.series(name), reference.series(name), rtol=1e-5, atol=1e-6, err_msg=name
        )
    for name in ("grad_hist", "act_hist"):
        counts, expected = run.histogram(name)[1], reference.histogram(name)[1]
        assert np.isfinite(expected).any()
        # compiled kernels may round a value lying on a bin edge differently
        assert np.nansum(np.abs(counts - expected)) <= 1e-3 * np.nansum(expected), name


@pytest.fixture(scope="module")
def eager_runs(tmp_path_factory) -> dict[str, gw.Run]:
    out = tmp_path_factory.mktemp("eager")
    return {kind: train(kind, out / kind, None)[0] for kind in ("mlp", "sequential", "transformer")}


@pytest.mark.parametrize("compile_as", ["wrap", "method"])
@pytest.mark.parametrize("kind", ["mlp", "sequential", "transformer"])
def test_compiled_model_records_the_eager_statistics_and_stops_compiling(
    eager_runs, tmp_path, caplog, kind, compile_as
):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        run, graphs = train(kind, tmp_path / "run", compile_as)
    assert_same_run(run, eager_runs[kind])
    assert graphs[WARM_UP - 1] == graphs[-1], f"new graphs after warm-up: {graphs}"
    assert dict(counters["graph_break"]) == {}
    dynamo_warnings = [w for w in caught if "dynamo" in str(w.filename) + str(w.message)]
    assert dynamo_warnings == []
    assert [r for r in caplog.records if r.name.startswith("torch._dynamo")] == []


def test_one_compiled_variant_per_probe_state(tmp_path):
    # Plain: one graph for the forward. Watched with every=1: a recorded and a probe variant,
    # plus the first probe step's, while gradwatch learns the forward order of the modules.
    dynamo.reset()
    counters.clear()
    model = make("transformer")
    compiled = torch.compile(model, backend="aot_eager")
    for x, _ in batches("transformer")[:3]:
        compiled(x).sum().backward()
    plain = counters["stats"]["unique_graphs"]
    _, graphs = train("transformer", tmp_path / "run", "wrap")
    assert plain == 1
    assert graphs[-1] <= plain + 2
    # With histograms on some probe steps only, those are one more variant.
    dynamo.reset()
    counters.clear()
    model = make("transformer")
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(
        compiled, optimizer, run_dir=tmp_path / "mixed", probe_every=2, histogram_every=2
    ):
        for x, y in batches("transformer")[:12]:
            nn.functional.cross_entropy(compiled(x).flatten(0, -2), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert counters["stats"]["unique_graphs"] <= plain + 3


@pytest.mark.parametrize("per_example", [False, True])
def test_watching_adds_no_graph_breaks_to_the_users_forward(tmp_path, per_example):
    """Also with per_example, whose probe steps record each layer's input and signal and run
    nn.MultiheadAttention's forward written out (here with its dropout on)."""
    model = make("transformer")
    for block in model.blocks:
        block.self_attn.dropout = 0.1
    tokens = batches("transformer")[0][0]
    dynamo.reset()
    plain = dynamo.explain(model)(tokens)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(
        model, optimizer, run_dir=tmp_path / "run", probe_every=1, per_example=per_example
    ) as w:
        # a probe step's forward, then a recorded step's
        for probe, mode in ((True, ProbeMode.PROBE), (False, ProbeMode.RECORD)):
            w._module_probes.mode = mode
            w._probe_records.set_step(probe, histograms=False)
            dynamo.reset()
            watched = dynamo.explain(model)(tokens)
            assert watched.graph_break_count == plain.graph_break_count == 0
            assert watched.graph_count == plain.graph_count


def test_per_example_under_compile_records_the_eager_norms(tmp_path):
    """per_example=True on a compiled transformer (nn.MultiheadAttention, embedding, layer
    norms): the eager run's per-example norms, no graph break, no new graph after warm-up. The
    first probe step sizes the signals' workspace, so its values are left out (`Capture`)."""
    eager, _ = train("transformer", tmp_path / "eager", None, per_example=True)
    run, graphs = train("transformer", tmp_path / "compiled", "wrap", per_example=True)
    assert dict(counters["graph_break"]) == {}
    assert graphs[WARM_UP - 1] == graphs[-1], f"new graphs after warm-up: {graphs}"
    probes = np.flatnonzero(np.isfinite(eager.series("pe_total_max")))
    assert len(probes) == STEPS // 5
    assert np.isnan(run.series("pe_total_max")[probes[0]])
    for name in ("pe_total_max", "pe_total_p50", "pe_top_share", "pe_norm_max"):
        np.testing.assert_allclose(
            run.series(name)[probes[1]:], eager.series(name)[probes[1]:], rtol=1e-4, atol=1e-7,
            err_msg=name,
        )  # fmt: skip


def test_compiled_with_inductor_records_the_eager_statistics(eager_runs, tmp_path):
    run, _ = train("mlp", tmp_path / "run", "wrap", backend="inductor", steps=STEPS)
    assert_same_run(run, eager_runs["mlp"])
