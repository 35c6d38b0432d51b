"""The run store: one SQLite database (WAL mode) per run, written by a thread, read by `Run`.

Layout: `meta` (JSON values), `tensors` and `modules` (the inventory, in order), `blocks` (one row
per flush: the steps and the statistics as compressed float32 arrays, never one row per number),
`arrays` (what probe steps record as arrays, e.g. the gradient through time: per block and name,
[probe steps, columns, width]), `findings` and `events`. Every flushed block is committed in its
own transaction before the next one, so a killed process leaves a store that opens and holds
every committed block. Nothing is pickled: arrays are raw little-endian float32/int64 bytes,
records are JSON.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.errors import InputError
from gradwatch.guards.base import Event
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import PendingBlock, ProbeArray, StatsBlock
from gradwatch.stats.flow import MODULE_STATS
from gradwatch.stats.grads import TENSOR_STATS
from gradwatch.stats.histograms import HISTOGRAM_EDGES

logger = logging.getLogger("gradwatch")

STORE_NAME = "run.sqlite"
# 2: the `arrays` table (probe-step profiles and histograms); version 1 stores read as without.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    idx INTEGER PRIMARY KEY, name TEXT NOT NULL, module TEXT NOT NULL,
    shape TEXT NOT NULL, dtype TEXT NOT NULL, numel INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS modules (
    idx INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    id INTEGER PRIMARY KEY, first_step INTEGER NOT NULL, n_steps INTEGER NOT NULL,
    steps BLOB NOT NULL,
    tensor_stats TEXT NOT NULL, tensor_data BLOB NOT NULL,
    module_stats TEXT NOT NULL, module_data BLOB NOT NULL,
    scalar_names TEXT NOT NULL, scalar_data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS findings (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, layer TEXT NOT NULL, step INTEGER NOT NULL,
    last_step INTEGER, severity TEXT NOT NULL, message TEXT NOT NULL, evidence TEXT NOT NULL,
    remedy TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS arrays (
    block INTEGER NOT NULL, name TEXT NOT NULL, columns TEXT NOT NULL, n_steps INTEGER NOT NULL,
    steps BLOB NOT NULL, width INTEGER NOT NULL, dtype TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, step INTEGER NOT NULL, guard TEXT NOT NULL,
    detail TEXT NOT NULL);
"""


def store_path(run_dir: str | Path) -> Path:
    """The database file of a run directory (or the file itself, if given)."""
    path = Path(run_dir)
    return path if path.suffix == ".sqlite" else path / STORE_NAME


def _pack(array: np.ndarray, dtype: str) -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=dtype).tobytes(), 1)


def _unpack(blob: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).reshape(shape)


_ARRAY_DTYPES = {4: "<f4", 8: "<f8"}  # probe arrays: float32 values, float64 counts


def _trim_width(data: np.ndarray) -> np.ndarray:
    """`data` [steps, columns, width] without the trailing positions that are NaN everywhere."""
    recorded = ~np.isnan(data).all(axis=(0, 1))
    width = int(np.flatnonzero(recorded)[-1]) + 1 if recorded.any() else 0
    return data[:, :, :width]


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
            conn.executescript(_SCHEMA)
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
                _pack(block.steps, "<i8"),
                json.dumps(block.tensor_stats),
                _pack(block.tensor_data, "<f4"),
                json.dumps(block.module_stats),
                _pack(block.module_data, "<f4"),
                json.dumps(block.scalar_names),
                _pack(block.scalar_data, "<f4"),
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
                    _pack(array.steps, "<i8"),
                    data.shape[2],
                    _ARRAY_DTYPES[data.dtype.itemsize],
                    _pack(data, _ARRAY_DTYPES[data.dtype.itemsize]),
                )
                for name, array in block.arrays.items()
                for data in [_trim_width(array.data)]
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


class Run:
    """Read-only view of a run store; works while the run is still being written.

    The view is a snapshot of the blocks committed when it was opened (so `steps` and every
    `series` stay aligned); `refresh()` takes in the blocks committed since.
    """

    def __init__(self, run_dir: str | Path) -> None:
        path = store_path(run_dir)
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(run_dir)!r} is not a gradwatch run: no {STORE_NAME} in it"
            )
        self.path = path
        try:
            self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            self._conn.execute("SELECT 1 FROM meta LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{str(path)!r} is not a readable gradwatch run store: {exc}") from exc
        self.refresh()

    def refresh(self) -> None:
        """Take in the blocks committed since this view was opened or last refreshed."""
        row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM blocks").fetchone()
        self._last_block = int(row[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def meta(self) -> dict[str, Any]:
        """Run metadata: config, model summary, versions, what was not watched and why."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    @property
    def tensors(self) -> list[str]:
        """Watched parameter names, in model order (the columns of per-tensor series)."""
        return [r[0] for r in self._conn.execute("SELECT name FROM tensors ORDER BY idx")]

    @property
    def tensor_info(self) -> list[dict[str, Any]]:
        """Per watched tensor: name, module, shape, dtype and numel, in model order."""
        rows = self._conn.execute(
            "SELECT name, module, shape, dtype, numel FROM tensors ORDER BY idx"
        )
        return [
            {"name": n, "module": m, "shape": tuple(json.loads(s)), "dtype": d, "numel": k}
            for n, m, s, d, k in rows
        ]

    @property
    def module_types(self) -> list[str]:
        """Class names of the probed modules, aligned with `modules`."""
        return [r[0] for r in self._conn.execute("SELECT type FROM modules ORDER BY idx")]

    @property
    def closed(self) -> bool:
        """Whether the run was closed (False while it is written, or after a crash)."""
        return bool(self.meta.get("closed", False))

    def blocks(self) -> Iterator[StatsBlock]:
        """The stored blocks in step order, as the writer flushed them."""
        n_tensors, n_modules = len(self.tensors), len(self.modules)
        rows = self._blocks(
            "id, n_steps, steps, tensor_stats, tensor_data, module_stats, module_data, "
            "scalar_names, scalar_data"
        )
        for block_id, n, steps, t_stats, t_data, m_stats, m_data, s_names, s_data in rows:
            t_stats, m_stats, s_names = (
                json.loads(t_stats),
                json.loads(m_stats),
                json.loads(s_names),
            )
            yield StatsBlock(
                steps=_unpack(steps, "<i8", (n,)),
                tensor_stats=tuple(t_stats),
                tensor_data=_unpack(t_data, "<f4", (n, n_tensors, len(t_stats))),
                module_stats=tuple(m_stats),
                module_data=_unpack(m_data, "<f4", (n, n_modules, len(m_stats))),
                scalar_names=tuple(s_names),
                scalar_data=_unpack(s_data, "<f4", (n, len(s_names))),
                arrays=self._block_arrays(block_id),
            )

    def _block_arrays(self, block_id: int) -> dict[str, ProbeArray]:
        if not self._has_arrays():
            return {}
        rows = self._conn.execute(
            "SELECT name, columns, n_steps, steps, width, dtype, data FROM arrays WHERE block = ?",
            (block_id,),
        )
        arrays = {}
        for name, columns, n, steps, width, dtype, blob in rows:
            columns = tuple(json.loads(columns))
            data = _unpack(blob, dtype, (n, len(columns), width))
            arrays[name] = ProbeArray(_unpack(steps, "<i8", (n,)), columns, data)
        return arrays

    def _has_arrays(self) -> bool:
        """Whether the store has the `arrays` table (schema version 2 on)."""
        return bool(
            self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'arrays'"
            ).fetchone()
        )

    @property
    def modules(self) -> list[str]:
        """Probed module names (qualified), in forward order (the columns of per-module series)."""
        return [r[0] for r in self._conn.execute("SELECT name FROM modules ORDER BY idx")]

    @property
    def attention_modules(self) -> list[str]:
        """The attention modules found (qualified names, in the order first seen): the columns
        of `attn_max_logit` and `attn_entropy`."""
        return self.probe_array(ATTENTION)[0]

    @property
    def steps(self) -> np.ndarray:
        """Recorded optimizer steps (0-based), ascending."""
        rows = self._blocks("n_steps, steps")
        parts = [_unpack(blob, "<i8", (n,)) for n, blob in rows]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def series(self, name: str) -> np.ndarray:
        """One statistic aligned with `steps`: [steps, tensors], [steps, modules],
        [steps, attention_modules] (`attn_max_logit`, `attn_entropy`) or [steps].

        NaN where the statistic was not recorded at a step (off a probe step, a None gradient).
        """
        if name in ATTENTION_STATS:
            data = self.probe_array(ATTENTION)[1]
            if data.shape[2] == 0:
                return np.zeros((len(data), 0), dtype=np.float32)
            return data[:, :, ATTENTION_STATS.index(name)]
        if name in TENSOR_STATS:
            return self._matrix(name, "tensor", len(self.tensors))
        if name in MODULE_STATS:
            return self._matrix(name, "module", len(self.modules))
        parts = []
        for n, names, blob in self._blocks("n_steps, scalar_names, scalar_data"):
            names = json.loads(names)
            data = _unpack(blob, "<f4", (n, len(names)))
            column = data[:, names.index(name)] if name in names else np.full(n, np.nan, "<f4")
            parts.append(column)
        if not any(name in json.loads(r[0]) for r in self._blocks("scalar_names")):
            raise KeyError(
                f"no statistic or scalar named {name!r} in this run; per-tensor: "
                f"{', '.join(TENSOR_STATS)}; per-module: {', '.join(MODULE_STATS)}; "
                f"scalars: {', '.join(self.scalar_names) or 'none'}"
            )
        return np.concatenate(parts)

    def through_time(self) -> dict[str, np.ndarray]:
        """Per recurrent module, ‖∂L/∂x_t‖ at each time step t of its input sequence:
        [len(steps), time steps], NaN off probe steps and past a step's sequence length.
        Empty for a model without recurrent modules (see `stats/through_time.py`)."""
        columns, data = self.probe_array("grad_through_time")
        return {name: data[:, c] for c, name in enumerate(columns)}

    def histogram(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A histogram recorded on probe steps: `(edges, counts)`, counts [len(steps), columns,
        bins] float64, NaN rows off probe steps. `"grad_hist"`: log10|g| per tensor (columns
        `tensors`); `"act_hist"`: output values per module (columns `modules`). The edges are
        documented in `stats/histograms.py`: exact zeros fall in grad_hist's first bin."""
        if name not in HISTOGRAM_EDGES:
            raise KeyError(
                f"no histogram named {name!r}; gradwatch records {', '.join(HISTOGRAM_EDGES)}"
            )
        columns, data = self.probe_array(name)
        order = self.tensors if name == "grad_hist" else self.modules
        counts = np.full((len(data), len(order), len(HISTOGRAM_EDGES[name]) - 1), np.nan)
        position = {c: i for i, c in enumerate(columns)}
        for i, column in enumerate(order):
            if column in position and data.shape[2]:
                counts[:, i, : data.shape[2]] = data[:, position[column]]
        return HISTOGRAM_EDGES[name].copy(), counts

    def probe_array(self, name: str) -> tuple[list[str], np.ndarray]:
        """An array recorded on probe steps: its column names and [len(steps), columns, width],
        NaN where it was not recorded."""
        if not self._has_arrays():
            return [], np.zeros((len(self.steps), 0, 0), dtype=np.float32)
        rows = self._conn.execute(
            "SELECT columns, n_steps, steps, width, dtype, data FROM arrays "
            "WHERE name = ? AND block <= ? ORDER BY block",
            (name, self._last_block),
        ).fetchall()
        parts = []
        names: dict[str, int] = {}
        for columns, n, steps, width, dtype, blob in rows:
            columns = json.loads(columns)
            names.update((c, len(names)) for c in columns if c not in names)
            data = _unpack(blob, dtype, (n, len(columns), width))
            parts.append((_unpack(steps, "<i8", (n,)), [names[c] for c in columns], data))
        all_steps = self.steps
        width = max((data.shape[2] for *_, data in parts), default=0)
        dtype = max((data.dtype for *_, data in parts), default=np.dtype(np.float32))
        out = np.full((len(all_steps), len(names), width), np.nan, dtype=dtype)
        for steps, columns, data in parts:
            rows_at = np.searchsorted(all_steps, steps)
            out[np.ix_(rows_at, columns, np.arange(data.shape[2]))] = data
        return list(names), out

    @property
    def scalar_names(self) -> list[str]:
        """Names of the per-step scalars: `global_grad_norm` and whatever `w.log` received."""
        names: dict[str, None] = {}
        for (row,) in self._blocks("scalar_names"):
            names.update(dict.fromkeys(json.loads(row)))
        return list(names)

    @property
    def findings(self) -> list[Finding]:
        rows = self._conn.execute(
            "SELECT kind, layer, step, severity, message, evidence, remedy, last_step "
            "FROM findings ORDER BY step, kind, layer"
        )
        return [
            Finding(kind, layer, step, severity, message, json.loads(evidence), remedy, last)
            for kind, layer, step, severity, message, evidence, remedy, last in rows
        ]

    @property
    def events(self) -> list[Event]:
        rows = self._conn.execute("SELECT kind, step, guard, detail FROM events ORDER BY id")
        return [Event(kind, step, guard, json.loads(detail)) for kind, step, guard, detail in rows]

    def _blocks(self, columns: str) -> list[tuple[Any, ...]]:
        return self._conn.execute(
            f"SELECT {columns} FROM blocks WHERE id <= ? ORDER BY id", (self._last_block,)
        ).fetchall()

    def _matrix(self, name: str, kind: str, width: int) -> np.ndarray:
        parts = []
        for n, stats, blob in self._blocks(f"n_steps, {kind}_stats, {kind}_data"):
            stats = json.loads(stats)
            data = _unpack(blob, "<f4", (n, width, len(stats)))
            parts.append(
                data[:, :, stats.index(name)]
                if name in stats
                else np.full((n, width), np.nan, "<f4")
            )
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)


def open_run(run_dir: str | Path) -> Run:
    """Open a run store read-only (also while it is being written). Reading never runs code."""
    return Run(run_dir)
