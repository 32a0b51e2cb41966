"""Shuffles through files: hash partitioning for the distributed global step, and the files a shuffle's tables
travel in.

A shuffle is M mapper tasks and P reducer tasks. Each mapper writes ONE Arrow IPC file into the run's work
folder, a record batch per destination, and returns at most a small summary; each reducer is told where the
files are (a `Gather`: a step's name, a range of mappers and the batch to take from each) and reads its slice
of every file. The driver so holds one object per task, O(M + P). Handing tables over as Ray objects instead,
one per mapper and destination, left M x P references in the driver, some 3 kB of Ray bookkeeping each: memory
that grew with the square of the partitions, so with the posts (docs/journal.md, "Ray shuffles through files,
session 4").

A file is written atomically under a name fixed by its step and mapper, so a task run again after its worker
died writes the same file again; the driver deletes a step's files once nothing can read them again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from murmur.files import atomic_path

_MIX = np.uint64(0x9E3779B97F4A7C15)
SHUFFLE_FOLDER = "shuffle"  # under the part files' folder, so cleared with it when a run starts


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each 64-bit key (ids, hashes and orders all spread evenly after the mix)."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(keys).astype(np.uint64) * _MIX
    return ((mixed >> np.uint64(33)) % np.uint64(parts)).astype(np.int64)


def split_by(table: pa.Table, column: str, parts: int, keys: np.ndarray | None = None) -> list[pa.Table]:
    """`table` split into `parts` tables by the partition of `column` (or of `keys`, one per row); rows keep
    their relative order within each part."""
    if parts == 1:
        return [table]
    values = table.column(column).to_numpy() if keys is None else keys
    owner = partition_of(values, parts)
    order = np.argsort(owner, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=parts))))
    ordered = table.take(pa.array(order))
    return [ordered.slice(bounds[p], bounds[p + 1] - bounds[p]) for p in range(parts)]


def concat(parts, schema: pa.Schema) -> pa.Table:
    """The tables a reducer was given, as one (an empty table of `schema` when there are none)."""
    tables = [t for t in parts if t is not None and t.num_rows]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


def step_folder(folder: str | Path, step: str) -> Path:
    return Path(folder) / SHUFFLE_FOLDER / step


def step_path(folder: str | Path, step: str, mapper: int) -> Path:
    """The file mapper `mapper` of shuffle step `step` writes."""
    return step_folder(folder, step) / f"{mapper:06d}.arrow"


def write_batches(path: Path, tables: list[pa.Table]) -> None:
    """`tables` (one schema) as one IPC file, table i as record batch i (empty ones too, so that batch i is
    always destination i's)."""
    schema = tables[0].schema
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for table in tables:
            writer.write_batch(pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns],
                                                          schema=schema))


@dataclass(frozen=True)
class Gather:
    """A reducer's input: record batch `batch` of the files of mappers [start, stop) of step `step`."""

    folder: str
    step: str
    batch: int
    start: int
    stop: int

    def read(self) -> pa.Table:
        batches, schema = [], None
        for mapper in range(self.start, self.stop):
            # Read, not mapped: only this batch's bytes (and the footer) come off the disk.
            with pa.OSFile(str(step_path(self.folder, self.step, mapper)), "rb") as source:
                reader = pa.ipc.open_file(source)
                schema = reader.schema
                batches.append(reader.get_batch(self.batch))
        return pa.Table.from_batches(batches, schema=schema)


def run_step(function, outputs: tuple[str, ...], *args):
    """A Ray task: `function(*args)` with every Gather among `args` read into its table. With `outputs` (file
    paths), the function returns a list whose first len(outputs) items are lists of tables, each written to
    its file as a shuffle's mapper output (a single table counts as a list of one); the rest of the list, a
    small summary, is returned. Without, the function's result is returned as it is."""
    result = function(*[a.read() if isinstance(a, Gather) else a for a in args])
    if not outputs:
        return result
    for path, tables in zip(outputs, result):
        write_batches(Path(path), [tables] if isinstance(tables, pa.Table) else list(tables))
    return list(result[len(outputs):])


def forget(folder: str | Path, step: str) -> None:
    """Delete a step's files: every task that reads them has finished, and no result a lost worker held must be
    made again from them."""
    shutil.rmtree(step_folder(folder, step), ignore_errors=True)
