"""Starting a run: the run store, opened on global rank 0 once every rank agrees on the set-up,
and the metadata the run records about itself."""

from __future__ import annotations

import datetime
import platform
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from gradwatch.config import WatchConfig
from gradwatch.distributed import Topology, agree, module_class
from gradwatch.guards.base import Guard
from gradwatch.inventory import Inventory
from gradwatch.run_writer import DiscardingWriter, RunWriter


def open_store(
    topology: Topology, run_dir: str, fingerprint: str, device: torch.device
) -> RunWriter | DiscardingWriter:
    """The run store on global rank 0 (a writer that keeps nothing elsewhere), once every rank
    agrees on `fingerprint`: a failure on one rank raises on all of them (one collective)."""
    writer: RunWriter | DiscardingWriter = DiscardingWriter()
    error: BaseException | None = None
    if topology.writes:
        try:
            writer = RunWriter(run_dir)
        except (FileExistsError, NotADirectoryError) as exc:  # their messages name run_dir
            error = exc
        except (OSError, sqlite3.Error) as exc:
            error = OSError(
                f"run_dir {run_dir!r} cannot be written ({exc}); "
                "pass a run_dir in a directory you can write to"
            )
            error.__cause__ = exc
    try:
        agree(topology, fingerprint, error, device)
    except BaseException:
        writer.close()
        raise
    return writer


def fingerprint(config: WatchConfig, guards: Sequence[Guard], inventory: Inventory) -> str:
    """What every rank must set up alike: the schedule, the guards' settings, the watched names."""
    settings = [
        (
            type(g).__name__,
            sorted(
                (k, v)
                for k, v in vars(g).items()
                if not k.startswith("_") and isinstance(v, (int, float, str))
            ),
        )
        for g in guards
    ]
    return repr(
        (
            (config.every, config.probe_every, config.flush_every, config.histogram_every),
            settings,
            [(t.name, t.shape) for t in inventory.tensors],
        )
    )


def run_meta(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: WatchConfig,
    inventory: Inventory,
    topology: Topology,
) -> dict[str, Any]:
    """The run's metadata: schedule, model, optimizer, what is not watched, where, versions."""
    from gradwatch.version import __version__

    return {
        "config": asdict(config),
        "model": {
            "class": module_class(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "watched_parameters": sum(t.numel for t in inventory.tensors),
            "repr": repr(model)[:20_000],
        },
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "not_watched": inventory.skipped,
        "device": str(inventory.device),
        "distributed": topology.meta(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": {
            "gradwatch": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
