"""What a framework callback passes to `gw.watch`, kept in one place for every integration."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradwatch as gw


def optimizer_run_dir(run_dir: str | Path | None, index: int) -> Path | None:
    """The run store of the `index`-th optimizer: `run_dir`, then `run_dir`-optimizer<k>
    (None: gw.watch's default)."""
    if run_dir is None or index == 0:
        return None if run_dir is None else Path(run_dir)
    return Path(f"{run_dir}-optimizer{index}")


class WatchSettings:
    """A callback's `run_dir`, `guards`, `sinks` and other `gw.watch` options."""

    def __init__(
        self,
        run_dir: str | Path | None,
        guards: Iterable[Any],
        sinks: Iterable[Any],
        options: dict[str, Any],
    ) -> None:
        self.run_dir = run_dir
        self.guards = list(guards)
        self.sinks = list(sinks)
        self.options = options

    def watch(
        self, model: Any, optimizer: Any, log: str, index: int = 0, clipping: Iterable[Any] = ()
    ) -> gw.Watcher:
        """`gw.watch` for the `index`-th optimizer: its own run store and copy of the guards
        (after the framework's `clipping`), the findings also to the logger named `log`."""
        guards = self.guards if index == 0 else copy.deepcopy(self.guards)  # not used yet
        return gw.watch(
            model,
            optimizer,
            run_dir=optimizer_run_dir(self.run_dir, index),
            guards=[*clipping, *guards],
            sinks=[gw.sinks.Logger(log), *self.sinks],
            **self.options,
        )
