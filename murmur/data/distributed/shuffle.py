"""Hash partitioning for the distributed global step: split a table by a key column into P tables, and call
Ray tasks that return one table per partition.

A shuffle is M mapper tasks each returning P tables and P reducer tasks each given one table of every mapper;
the driver only holds the M x P object references, never the rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_MIX = np.uint64(0x9E3779B97F4A7C15)


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


def call(remote_function, n_out: int, *args) -> list:
    """Start a Ray task returning `n_out` objects; their references as a list (also when n_out is 1)."""
    refs = remote_function.options(num_returns=n_out).remote(*args)
    return [refs] if n_out == 1 else list(refs)
