"""`Run` and `open_run`: read a run store (`store.py`), also while it is being written; nothing
is executed from it (no pickles)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.detect.findings import Finding
from gradwatch.errors import InputError
from gradwatch.guards.base import Event
from gradwatch.stats.attention import ATTENTION, ATTENTION_STATS
from gradwatch.stats.buffer import ProbeArray, StatsBlock
from gradwatch.stats.flow import MODULE_STATS
from gradwatch.stats.grads import TENSOR_STATS
from gradwatch.stats.histograms import HISTOGRAM_EDGES
from gradwatch.store import STORE_NAME, store_path, unpack

logger = logging.getLogger("gradwatch")


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
                steps=unpack(steps, "<i8", (n,)),
                tensor_stats=tuple(t_stats),
                tensor_data=unpack(t_data, "<f4", (n, n_tensors, len(t_stats))),
                module_stats=tuple(m_stats),
                module_data=unpack(m_data, "<f4", (n, n_modules, len(m_stats))),
                scalar_names=tuple(s_names),
                scalar_data=unpack(s_data, "<f4", (n, len(s_names))),
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
            data = unpack(blob, dtype, (n, len(columns), width))
            arrays[name] = ProbeArray(unpack(steps, "<i8", (n,)), columns, data)
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
        parts = [unpack(blob, "<i8", (n,)) for n, blob in rows]
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
            data = unpack(blob, "<f4", (n, len(names)))
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
            data = unpack(blob, dtype, (n, len(columns), width))
            parts.append((unpack(steps, "<i8", (n,)), [names[c] for c in columns], data))
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
            data = unpack(blob, "<f4", (n, width, len(stats)))
            parts.append(
                data[:, :, stats.index(name)]
                if name in stats
                else np.full((n, width), np.nan, "<f4")
            )
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)


def open_run(run_dir: str | Path) -> Run:
    """Open a run store read-only (also while it is being written). Reading never runs code."""
    return Run(run_dir)
