"""A synthetic run store of any size, written through the real writer: for report benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradwatch.inventory import TensorInfo
from gradwatch.run_writer import RunWriter
from gradwatch.stats.buffer import HostCopy, PendingBlock
from gradwatch.stats.flow import MODULE_STATS
from gradwatch.stats.grads import TENSOR_STATS


def _host(array: np.ndarray) -> HostCopy:
    return HostCopy(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), None)


def synthetic_run(
    path: Path,
    tensors: int = 200,
    steps: int = 100_000,
    block: int = 50,
    probe_every: int = 10,
    seed: int = 0,
) -> Path:
    """A closed run of `tensors` parameter tensors (100 modules) and `steps` recorded steps."""
    rng = np.random.default_rng(seed)
    writer = RunWriter(path)
    modules = tensors // 2
    writer.write_meta(
        {
            "config": {"flush_every": block, "probe_every": probe_every},
            "model": {"class": "Synthetic", "parameters": tensors * 1000},
        }
    )
    writer.write_tensors(
        [
            TensorInfo(
                f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}",
                f"layers.{i // 2}",
                (32, 32) if i % 2 == 0 else (32,),
                "float32",
                1024 if i % 2 == 0 else 32,
            )
            for i in range(tensors)
        ]
    )
    writer.write_modules([(f"layers.{i}", "Linear") for i in range(modules)])
    level = np.logspace(-3, 0, tensors)
    for first in range(0, steps, block):
        n = min(block, steps - first)
        step_ids = np.arange(first, first + n)
        probe = (step_ids % probe_every == 0)[:, None]
        grad = level * rng.lognormal(0, 0.3, (n, tensors))
        tensor_data = np.full((n, tensors, len(TENSOR_STATS)), np.nan)
        tensor_data[:, :, 0] = grad
        tensor_data[:, :, 1:] = np.where(
            probe[:, :, None], rng.random((n, tensors, len(TENSOR_STATS) - 1)), np.nan
        )
        module_data = np.where(
            probe[:, :, None], rng.random((n, modules, len(MODULE_STATS))), np.nan
        )
        scalars = np.stack([np.sqrt((grad**2).sum(1)), 2.0 * np.exp(-step_ids / steps)], axis=1)
        writer.write_block(
            PendingBlock(
                list(step_ids),
                TENSOR_STATS,
                _host(tensor_data),
                MODULE_STATS,
                _host(module_data),
                ("global_grad_norm", "loss"),
                _host(scalars),
            )
        )
    writer.write_meta({"closed": True})
    writer.close()
    return path
