"""`RunWriter`: writes a run store (`store.py`) from a thread of its own: each flushed block is
committed in its own transaction, in order, so a killed process keeps every committed block;
`DiscardingWriter` stands in for it on ranks other than 0."""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gradwatch.detect.findings import Finding
from gradwatch.guards.base import Event
from gradwatch.stats.buffer import PendingBlock, StatsBlock
from gradwatch.store import ARRAY_DTYPES, SCHEMA, SCHEMA_VERSION, pack, store_path, trim_width

logger = logging.getLogger("gradwatch")


def _finding_key(f: Finding) -> str:
    # One row per (kind, layer, first step): a finding that is extended keeps its key.
    return f"{f.kind}|{f.layer}|{f.step}"


class RunWriter:
    """Creates a run store and commits to it from a background thread, in submission order.

    Creating it validates the path in the caller's thread (so a bad run_dir fails at `watch()`);
    all later writes happen in the writer thread. `block_listeners` run in that thread on each
    committed block (detectors, sinks): the training step never waits for them.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = store_path(run_dir)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:  # a file where a directory must be
            blocking = next(p for p in (self.path.parent, *self.path.parent.parents) if p.exists())
            raise NotADirectoryError(
                f"run_dir {str(self.path.parent)!r} cannot be created as a directory: "
                f"{str(blocking)!r} is a file; pass the path of a directory (new or empty)"
            ) from exc
        if self.path.exists():
            raise FileExistsError(
                f"run_dir {str(self.path.parent)!r} already holds a gradwatch run; "
                "pass a new run_dir or delete the old run first"
            )
        # Built under another name and renamed into place, so that a reader never finds the file
        # before its tables exist.
        draft = self.path.with_name(f".{self.path.name}.{os.getpid()}.draft")
        conn = sqlite3.connect(draft)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            conn.execute(
                "INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),)
            )
            conn.commit()
        finally:
            conn.close()
        os.replace(draft, self.path)
        self.block_listeners: list[Callable[[StatsBlock], None]] = []
        self.error: BaseException | None = None  # the first failed write
        self.failures = 0
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()

    # Called from the training thread: each call only enqueues.
    def write_meta(self, meta: dict[str, Any]) -> None:
        self._submit(self._insert_meta, meta)

    def write_tensors(self, tensors: Iterable[Any]) -> None:
        """The watched tensors (objects with name, module, shape, dtype, numel), in order."""
        self._submit(self._insert_tensors, list(tensors))

    def write_modules(self, modules: Iterable[tuple[str, str]]) -> None:
        """The probed modules as (name, type), in forward order."""
        self._submit(self._insert_modules, list(modules))

    def write_block(self, pending: PendingBlock) -> None:
        """Commit a flushed block once its copy to the host has landed."""
        self._submit(self._insert_block, pending)

    def write_findings(self, findings: Iterable[Finding]) -> None:
        self._submit(self._upsert_findings, list(findings))

    def write_events(self, events: Iterable[Event]) -> None:
        self._submit(self._insert_events, list(events))

    def drain(self) -> None:
        """Wait until everything submitted so far is committed."""
        self._queue.join()

    def close(self) -> None:
        """Commit what is queued, stop the thread, and raise the first write error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(
                f"gradwatch could not write the run store {self.path}"
            ) from self.error

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the run store {self.path} is closed")
        self._queue.put((fn, args))

    # Everything below runs in the writer thread.
    def _run(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
        try:
            while (item := self._queue.get()) is not None:
                fn, args = item
                try:
                    with conn:
                        fn(conn, *args)
                except Exception as exc:  # keep training alive; close() raises the first
                    self.failures += 1
                    self.error = self.error or exc
                    logger.error(
                        "gradwatch: writing the run store %s failed (%s, failure %d): %s; what "
                        "it held is lost, later writes are tried",
                        self.path,
                        getattr(fn, "__name__", "a write").removeprefix("_insert_"),
                        self.failures,
                        exc,
                    )
                finally:
                    self._queue.task_done()
        finally:
            self._queue.task_done()
            conn.close()

    def _insert_meta(self, conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [(k, json.dumps(v, default=str)) for k, v in meta.items()],
        )

    def _insert_tensors(self, conn: sqlite3.Connection, tensors: list[Any]) -> None:
        conn.executemany(
            "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?)",
            [
                (i, t.name, t.module, json.dumps(t.shape), t.dtype, t.numel)
                for i, t in enumerate(tensors)
            ],
        )

    def _insert_modules(self, conn: sqlite3.Connection, modules: list[tuple[str, str]]) -> None:
        conn.executemany(
            "INSERT INTO modules VALUES (?, ?, ?)",
            [(i, name, kind) for i, (name, kind) in enumerate(modules)],
        )

    def _insert_block(self, conn: sqlite3.Connection, pending: PendingBlock) -> None:
        block = pending.wait()
        cursor = conn.execute(
            "INSERT INTO blocks (first_step, n_steps, steps, tensor_stats, tensor_data, "
            "module_stats, module_data, scalar_names, scalar_data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                int(block.steps[0]),
                len(block.steps),
                pack(block.steps, "<i8"),
                json.dumps(block.tensor_stats),
                pack(block.tensor_data, "<f4"),
                json.dumps(block.module_stats),
                pack(block.module_data, "<f4"),
                json.dumps(block.scalar_names),
                pack(block.scalar_data, "<f4"),
            ),
        )
        conn.executemany(
            "INSERT INTO arrays VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    cursor.lastrowid,
                    name,
                    json.dumps(array.columns),
                    len(array.steps),
                    pack(array.steps, "<i8"),
                    data.shape[2],
                    ARRAY_DTYPES[data.dtype.itemsize],
                    pack(data, ARRAY_DTYPES[data.dtype.itemsize]),
                )
                for name, array in block.arrays.items()
                for data in [trim_width(array.data)]
            ],
        )
        conn.commit()  # the block is durable before any listener sees it
        for listener in self.block_listeners:
            try:
                listener(block)
            except Exception:  # a failing detector or sink must not stop the store
                logger.exception(
                    "gradwatch: %r failed on the block at step %d", listener, block.steps[0]
                )

    def _upsert_findings(self, conn: sqlite3.Connection, findings: list[Finding]) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    _finding_key(f),
                    f.kind,
                    f.layer,
                    f.step,
                    f.last_step,
                    f.severity,
                    f.message,
                    json.dumps(f.evidence, default=float),
                    f.remedy,
                )
                for f in findings
            ],
        )

    def _insert_events(self, conn: sqlite3.Connection, events: list[Event]) -> None:
        conn.executemany(
            "INSERT INTO events (kind, step, guard, detail) VALUES (?, ?, ?, ?)",
            [(e.kind, e.step, e.guard, json.dumps(e.detail, default=float)) for e in events],
        )


class DiscardingWriter:
    """What a rank other than 0 has instead of a `RunWriter`: it takes every write and keeps
    nothing, so that only global rank 0 creates files (no shared file system is assumed)."""

    def __init__(self) -> None:
        self.block_listeners: list[Callable[[StatsBlock], None]] = []
        self.error: BaseException | None = None  # the first failed write
        self.failures = 0

    def _discard(self, *args: Any) -> None:
        return None

    write_meta = write_tensors = write_modules = write_block = _discard
    write_findings = write_events = drain = close = _discard
