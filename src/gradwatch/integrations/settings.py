"""What a framework callback passes to `gw.watch`, kept in one place for every integration."""

from __future__ import annotations

import copy
import logging
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


def report_unwatched(log: str, what: str, error: BaseException) -> None:
    """A set-up gradwatch cannot watch, told in the framework's log: the training goes on
    unwatched (DESIGN invariant 8), with the reason and so what to change."""
    logging.getLogger(log).warning(
        "gradwatch: %s is not watched, the training goes on without gradwatch: %s", what, error
    )


class SharedSink:
    """One of the user's sinks, passed to the watchers of several optimizers: each writes to
    it, and it is closed once, when the last of them closes."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.users = 0

    def use(self) -> SharedSink.User:
        self.users += 1
        return SharedSink.User(self)

    class User:
        """What one watcher holds: writes pass through; `close()` counts down."""

        def __init__(self, shared: SharedSink) -> None:
            self._shared = shared
            self._closed = False

        def write_block(self, *args: Any) -> None:
            self._shared.sink.write_block(*args)

        def write_findings(self, *args: Any) -> None:
            self._shared.sink.write_findings(*args)

        def close(self) -> None:
            if self._closed:
                return
            self._closed = True
            self._shared.users -= 1
            if self._shared.users == 0:
                self._shared.sink.close()


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
        self.sinks = [SharedSink(sink) for sink in sinks]
        self.options = options

    def watch(
        self, model: Any, optimizer: Any, log: str, index: int = 0, clipping: Iterable[Any] = ()
    ) -> gw.Watcher:
        """`gw.watch` for the `index`-th optimizer: its own run store and copy of the guards
        (after the framework's `clipping`), the findings also to the logger named `log`."""
        guards = self.guards if index == 0 else copy.deepcopy(self.guards)  # not used yet
        sinks = [sink.use() for sink in self.sinks]
        try:
            return gw.watch(
                model,
                optimizer,
                run_dir=optimizer_run_dir(self.run_dir, index),
                guards=[*clipping, *guards],
                sinks=[gw.sinks.Logger(log), *sinks],
                **self.options,
            )
        except BaseException:
            for sink in sinks:  # no watcher holds them: give the uses back
                sink.close()
            raise
