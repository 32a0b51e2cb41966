"""Part files: the global step's tasks write the rows of the outputs (a group's posts and quarantine, a
partition's conversations) into the work folder, and one more task copies them, a row group at a time, into the
staged output files.

The driver fetches only counts. A table it fetched maps its object-store pages into the driver and copies its
rows, and decoding and encoding Parquet there costs it tens of MB of allocator arenas besides: memory that grew
with the posts (docs/journal.md, "Ray driver memory, session 4"). A task run again after its worker died
writes the same files again, atomically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from murmur.files import atomic_path

PART_ROWS = 8192  # rows in a part file's row group: what the copying task holds at once
PARTS_FOLDER = "global"  # beside the read tasks' files; redone by every run, so cleared when one starts


def part_path(folder: str | Path, kind: str, index: int) -> Path:
    """Where group or partition `index` of output `kind` (posts, quarantine, conversations) is written."""
    return Path(folder) / PARTS_FOLDER / f"{kind}-{index:06d}.parquet"


def write_part(path: Path, schema: pa.Schema, tables: list[pa.Table]) -> int:
    """`tables` in order as one part file of row groups of at most PART_ROWS rows; the rows written."""
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for table in tables:
            if table.num_rows:
                writer.write_table(table, row_group_size=PART_ROWS)
                rows += table.num_rows
    return rows


def append_part(writer: pq.ParquetWriter, path: Path) -> None:
    """Copy a part file's rows into an output being written, one row group at a time."""
    with pq.ParquetFile(path) as part:
        for index in range(part.num_row_groups):
            writer.write_table(part.read_row_group(index, use_threads=False))


def write_outputs(folder: str, work: str, groups: int, partitions: int, settings_json: str) -> None:
    """A Ray task: posts.parquet (the groups' posts in order, then the canaries), quarantine.parquet and
    conversations.parquet staged in `work` from the part files."""
    from murmur.data import canaries as canary_module
    from murmur.data.records import CONVERSATION_SCHEMA, POST_SCHEMA, QUARANTINE_SCHEMA
    from murmur.settings.data import DataSettings

    settings = DataSettings.model_validate_json(settings_json)
    outputs = [("posts", POST_SCHEMA, groups), ("quarantine", QUARANTINE_SCHEMA, groups),
               ("conversations", CONVERSATION_SCHEMA, partitions)]
    for kind, schema, count in outputs:
        with atomic_path(Path(work) / f"{kind}.parquet") as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for index in range(count):
                append_part(writer, part_path(folder, kind, index))
            if kind == "posts":
                canaries = canary_module.canary_rows(canary_module.make_canaries(
                    settings.canaries, settings.canary_repeats, settings.seed))
                if canaries:
                    writer.write_table(pa.Table.from_pylist(canaries, schema=POST_SCHEMA))
