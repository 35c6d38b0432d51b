"""The run store: one SQLite database (WAL mode) per run, written by a thread, read by `Run`.

Layout: `meta` (JSON values), `tensors` and `modules` (the inventory, in order), `blocks` (one row
per flush: the steps and the statistics as compressed float32 arrays, never one row per number),
`arrays` (what probe steps record as arrays, e.g. the gradient through time: per block and name,
[probe steps, columns, width]), `findings` and `events`. Every flushed block is committed in its
own transaction before the next one, so a killed process leaves a store that opens and holds
every committed block. Nothing is pickled: arrays are raw little-endian float32/int64 bytes,
records are JSON.

The format lives here (the schema, the file name, how arrays are packed); `run_writer.py` writes
a store and `run_reader.py` reads one.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

STORE_NAME = "run.sqlite"
# 2: the `arrays` table (probe-step profiles and histograms); version 1 stores read as without.
SCHEMA_VERSION = 2

SCHEMA = """
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


def pack(array: np.ndarray, dtype: str) -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=dtype).tobytes(), 1)


def unpack(blob: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).reshape(shape)


ARRAY_DTYPES = {4: "<f4", 8: "<f8"}  # probe arrays: float32 values, float64 counts


def trim_width(data: np.ndarray) -> np.ndarray:
    """`data` [steps, columns, width] without the trailing positions that are NaN everywhere."""
    recorded = ~np.isnan(data).all(axis=(0, 1))
    width = int(np.flatnonzero(recorded)[-1]) + 1 if recorded.any() else 0
    return data[:, :, :width]
