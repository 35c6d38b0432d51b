"""No host sync on any path of the training step: every step, probe steps, histogram steps,
flushes, per-example norms, recurrent cells and packed sequences, the attention probes, the
guards (SkipNonFinite and Rollback decide on the host, on lines marked `# host sync:`).

`SyncSentinel` (tests/sync_sentinel.py) recognises on the CPU what syncs on a GPU and names
gradwatch's line; the DDP and FSDP2 flushes run under it in `test_distributed.py`. With CUDA,
the same workloads also run under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import linecache
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformer_proxy as proxy
from sync_sentinel import SyncSentinel, unmarked_site
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradwatch as gw


class CellLoop(nn.Module):
    """An LSTMCell and a GRUCell called once per time step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, 8)
        self.gru = nn.GRUCell(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = c = g = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
        return self.head(g)


class Packed(nn.Module):
    """An LSTM over padded sequences of different lengths, packed."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


@dataclass
class Workload:
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    target: Callable[[], Tensor]
    recorded: str  # a series the feature writes: the run must hold finite values of it
    options: dict[str, Any] = field(default_factory=dict)
    micro_batches: int = 1


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(36, 3),
    )  # fmt: skip


def classes(batch: int = 16) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, 3, (batch,))


def tokens() -> Tensor:
    return torch.randint(0, proxy.VOCAB, (4, proxy.LENGTH))


GUARDS = lambda: [  # noqa: E731 - a fresh set per run
    gw.guards.SkipNonFinite(), gw.guards.ClipValue(0.05), gw.guards.AGC(),
    gw.guards.AutoClip(), gw.guards.ZClip(warmup=2), gw.guards.ClipNorm(0.5),
    gw.guards.Rollback(every=2),
]  # fmt: skip

WORKLOADS = {
    "mlp": Workload(mlp, lambda: (torch.randn(16, 6),), classes(), "grad_hist"),
    "cnn_batchnorm": Workload(cnn, lambda: (torch.randn(16, 1, 8, 8),), classes(), "norm_values"),
    "transformer_explicit": Workload(
        lambda: proxy.make_model("explicit"), lambda: (tokens(),), tokens, "attn_max_logit"
    ),
    "transformer_sdpa": Workload(
        lambda: proxy.make_model("sdpa"), lambda: (tokens(),), tokens, "attn_max_logit"
    ),
    "transformer_mha": Workload(
        lambda: proxy.make_model("mha"), lambda: (tokens(),), tokens, "attn_max_logit"
    ),
    "per_example_mlp": Workload(
        mlp, lambda: (torch.randn(16, 6),), classes(), "pe_total_max", {"per_example": True}
    ),
    "per_example_transformer": Workload(
        lambda: proxy.make_model("sdpa"),
        lambda: (tokens(),),
        tokens,
        "pe_total_max",
        {"per_example": True},
    ),
    "recurrent_cells": Workload(
        CellLoop, lambda: (torch.randn(16, 5, 4),), classes(), "time_first_to_last"
    ),
    "packed_sequence": Workload(
        Packed,
        lambda: (torch.randn(16, 5, 4), torch.arange(16) % 5 + 1),
        classes(),
        "time_first_to_last",
    ),
    "micro_batches": Workload(
        mlp, lambda: (torch.randn(16, 6),), classes(), "gns_batch", micro_batches=2
    ),
    "guards": Workload(
        mlp, lambda: (torch.randn(16, 6),), classes(), "ZClip.scale", {"guards": GUARDS}
    ),
}


def loss_of(model: nn.Module, inputs: tuple[Any, ...], target: Tensor) -> Tensor:
    logits = model(*inputs)
    return nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten())


def train(workload: Workload, run_dir, steps: int = 7) -> tuple[SyncSentinel, gw.Run]:
    """`steps` steps with probes every 2, histograms on every probe step, a flush every 3 steps
    and the loss logged as a tensor; everything after watch() under the sentinel."""
    model = workload.make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"probe_every": 2, "histogram_every": 1, "flush_every": 3, **workload.options}
    if "guards" in options:
        options["guards"] = options["guards"]()
    data = [(workload.inputs(), workload.target()) for _ in range(steps)]
    w = gw.watch(model, optimizer, run_dir=run_dir, **options)
    with SyncSentinel() as sentinel:
        for inputs, target in data:
            optimizer.zero_grad()
            parts = workload.micro_batches
            for part in range(parts):
                chunk = tuple(t.chunk(parts)[part] for t in inputs)
                loss = loss_of(model, chunk, target.chunk(parts)[part]) / parts
                loss.backward()
            optimizer.step()
            w.log(loss=loss.detach())
        w.close()
    return sentinel, gw.open_run(run_dir)


@pytest.mark.parametrize("name", WORKLOADS)
def test_no_host_sync_in_the_step_path(name, tmp_path):
    workload = WORKLOADS[name]
    sentinel, run = train(workload, tmp_path / "run")
    assert not sentinel.sites, f"host syncs in gradwatch's step path:\n{sentinel.summary()}"
    assert len(run.steps) == 7 and not run.findings
    assert np.isfinite(recorded(run, workload.recorded)).any(), workload.recorded


def recorded(run: gw.Run, name: str) -> np.ndarray:
    return run.histogram(name)[1] if name.endswith("_hist") else run.series(name)


def test_manual_steps_make_no_host_sync(tmp_path):
    """Without an optimizer: `w.step()` records; the sentinel covers it and the flushes."""
    model = mlp()
    w = gw.watch(model, run_dir=tmp_path / "run", probe_every=2, flush_every=3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with SyncSentinel() as sentinel:
        for _ in range(5):
            model.zero_grad()
            loss_of(model, (x,), y).backward()
            w.step()
        w.close()
    assert not sentinel.sites, sentinel.summary()
    assert len(gw.open_run(tmp_path / "run").steps) == 5


SYNCS = (
    "x[x > 2]", "x.nonzero()", "bool(x.sum())", "x.tolist()", "x.cpu()", "x.sum().item()",
    "torch.repeat_interleave(x, x.long())", "torch.zeros(2)", "torch.tensor([1.0])",
    "torch.equal(x, x)", "x.unique()",
)  # fmt: skip


INSIDE_GRADWATCH = str(Path(gw.__file__).with_name("_sentinel_example.py"))  # no such file


def run_code(code: str, path: str) -> None:
    """Run `code` (one call per line) as if written in the file at `path`."""
    linecache.cache[path] = (len(code), None, code.splitlines(keepends=True), path)
    exec(compile(code, path, "exec"), {"torch": torch, "x": torch.arange(6.0)})


def test_the_sentinel_names_each_sync_in_gradwatchs_code_and_passes_the_users():
    with SyncSentinel() as users:
        run_code("\n".join(SYNCS), __file__)
    assert users.sites == {}
    with SyncSentinel() as gradwatchs:
        run_code("\n".join(SYNCS), INSIDE_GRADWATCH)
    lines = sorted(int(site.split(":")[1].split()[0]) for site in gradwatchs.sites)
    assert lines == list(range(1, len(SYNCS) + 1)), gradwatchs.summary()
    with SyncSentinel() as fine:
        run_code("torch.zeros(2, device=x.device) + x.sum() * 2\nx.max() > 1", INSIDE_GRADWATCH)
        run_code("bool(x.sum())  # host sync: a guard decides on the host", INSIDE_GRADWATCH)
    assert fine.sites == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", WORKLOADS)
def test_no_cuda_sync_in_the_step_path(name, tmp_path):
    """The same runs on the GPU, under the sentinel and `torch.cuda.set_sync_debug_mode("warn")`,
    which warns at every synchronising CUDA call: none may come from an unmarked gradwatch line
    (the user's own, e.g. pack_padded_sequence moving its sort order, are not gradwatch's)."""
    workload = WORKLOADS[name]
    device = torch.device("cuda")

    def inputs() -> tuple[Any, ...]:  # a PackedSequence's lengths stay on the host
        return tuple(t if t.dim() == 1 else t.to(device) for t in workload.inputs())

    on_gpu = Workload(
        lambda: workload.make().to(device), inputs, lambda: workload.target().to(device),
        workload.recorded, workload.options, workload.micro_batches,
    )  # fmt: skip
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sentinel, run = train(on_gpu, tmp_path / "run")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [
        f"{site}: {w.message}"
        for w in caught
        if "synchroniz" in str(w.message)
        and (site := unmarked_site(w.filename, w.lineno)) is not None
    ]
    assert not syncs, "\n".join(syncs)
    assert not sentinel.sites, sentinel.summary()
    assert len(run.steps) == 7 and np.isfinite(recorded(run, workload.recorded)).any()


def test_device_constants_are_made_once_and_hold_their_values():
    from gradwatch.stats.device import constant, to_device

    cpu = torch.device("cpu")
    first = constant((3, 1, 2), cpu, torch.long)
    assert constant((3, 1, 2), cpu, torch.long) is first  # cached: no second copy
    assert first.tolist() == [3, 1, 2] and first.dtype == torch.long
    assert constant((3, 1, 2), cpu, torch.float64).dtype == torch.float64
    host = torch.arange(4)
    assert to_device(host, cpu) is host  # on the CPU the host tensor itself
    np.testing.assert_array_equal(to_device([0.5, 0.25], cpu).numpy(), [0.5, 0.25])
