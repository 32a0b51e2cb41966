"""Read tasks: every source file, or byte range of a large plain line-per-record file, is read, cleaned,
filtered and fingerprinted on a worker, which writes the results into the run's work folder.

A range holds the lines that start inside it, so ranges split a file on line boundaries without reading it
first; line numbers (which name quarantined records and `FILE:LINE` ids) come from counting the line ends
before each range, also on workers. A task's outputs are `map-NNNNNN.parquet` (the surviving posts, with
`order`, the post's place in the input) and `map-NNNNNN.json` (counts, quarantined records, authors of
dropped posts), the summary last: a task whose summary exists is complete, and a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from murmur.data.batch import BatchProcessor, survivor_schema
from murmur.data.sources import GZIP_MAGIC, ZSTD_MAGIC, FileReader, SourceFile
from murmur.files import atomic_path, write_json_atomic
from murmur.settings.data import DataSettings

SPLITTABLE = ("jsonl", "text")  # one record per line, so any line start is a record start
ORDER_BITS = 32  # order = task << 32 | the record's place in its task
COUNT_PIECE = 1 << 23


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a file, or the lines starting in [start, end) of a plain file."""

    index: int
    format: str
    path: str
    notes: str | None = None
    start: int = 0
    end: int | None = None
    first_line: int = 1
    url: str | None = None

    def source(self) -> SourceFile:
        return SourceFile(self.format, Path(self.path), Path(self.notes) if self.notes else None,
                          self.start, self.end, self.first_line, self.url)

    def size(self) -> int:
        """The bytes this task reads (its share of the progress line)."""
        return (self.end if self.end is not None else self.source().size()) - self.start


def plan_ranges(sources: list[SourceFile], split_bytes: int) -> list[ReadTask]:
    """Read tasks in input order, line numbers not yet known (see `number_lines`)."""
    tasks: list[ReadTask] = []
    for source in sources:
        size = source.size()
        notes = str(source.notes) if source.notes else None
        if source.format in SPLITTABLE and size > split_bytes and _plain(source):
            for start in range(0, size, split_bytes):
                tasks.append(ReadTask(len(tasks), source.format, str(source.path), notes, start,
                                      min(size, start + split_bytes), url=source.url))
        else:
            tasks.append(ReadTask(len(tasks), source.format, str(source.path), notes, url=source.url))
    return tasks


def _plain(source: SourceFile) -> bool:
    with source.open_raw() as probe:
        head = probe.read(4)
    return not (head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC))


def line_ends_between(task: ReadTask, low: int, high: int) -> int:
    """How many line ends the bytes [low, high) of a task's file hold, read in bounded pieces."""
    count = 0
    with task.source().open_raw() as file:
        file.seek(low)
        left = high - low
        while left > 0:
            piece = file.read(min(COUNT_PIECE, left))
            if not piece:
                break
            count += piece.count(b"\n")
            left -= len(piece)
    return count


def count_spans(tasks: list[ReadTask]) -> list[tuple[ReadTask, int, int]]:
    """For each range after a file's first: the bytes whose line ends number its first line (see number_lines)."""
    spans = []
    for previous, task in zip(tasks, tasks[1:]):
        if task.start > 0:
            spans.append((task, max(0, previous.start - 1), task.start - 1))
    return spans


def number_lines(tasks: list[ReadTask], counts: list[int]) -> list[ReadTask]:
    """The tasks with first_line set: a range starting at byte S reads from the line after the first line end
    at or after S - 1, so its first line is 2 + the line ends before S - 1 (counts: from count_spans)."""
    numbered, before, used = [], 0, iter(counts)
    for task in tasks:
        if task.start == 0:
            before = 0
            numbered.append(task)
            continue
        before += next(used)
        numbered.append(dataclasses.replace(task, first_line=before + 2))
    return numbered


def task_names(index: int) -> tuple[str, str]:
    return f"map-{index:06d}.parquet", f"map-{index:06d}.json"


def run_read_task(task: ReadTask, settings_json: str, folder: str) -> dict:
    """Read, clean, filter and fingerprint one task's records in batches; write its outputs; its counts."""
    settings = DataSettings.model_validate_json(settings_json)
    processor = BatchProcessor.for_settings(settings_json)
    table_name, summary_name = task_names(task.index)
    folder = Path(folder)
    schema = survivor_schema(settings.minhash_bands).append(pa.field("order", pa.int64()))
    base = task.index << ORDER_BITS
    summary = {"n_in": 0, "kept": 0, "dropped": Counter(), "in_by_source": Counter(), "quarantine": [],
               "dropped_authors": {}}
    import pyarrow.parquet as pq

    with atomic_path(folder / table_name) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        batch, batch_number, position = [], 0, 0
        records = FileReader(task.source(), settings).records()
        while True:
            record = next(records, None)
            if record is not None:
                batch.append(record)
            if batch and (record is None or len(batch) >= settings.batch_size):
                result = processor.process(batch_number, batch)
                orders = np.asarray(result.kept_positions, dtype=np.int64) + base + position
                writer.write_table(result.table.append_column("order", pa.array(orders, pa.int64())))
                summary["n_in"] += result.n_in
                summary["kept"] += result.table.num_rows
                summary["dropped"].update(result.dropped)
                summary["in_by_source"].update(result.in_by_source)
                for row, at in zip(result.quarantine, result.quarantine_positions):
                    summary["quarantine"].append(row | {"order": base + position + at})
                # First seen: (filter drop, task, batch, place among this batch's dropped authors).
                for rank, (author, count) in enumerate(result.dropped_authors.items()):
                    seen = summary["dropped_authors"].setdefault(author, [0, [0, task.index, batch_number, rank]])
                    seen[0] += count
                position += len(batch)
                batch, batch_number = [], batch_number + 1
            if record is None:
                break
    summary["dropped_authors"] = [[author, count, first] for author, (count, first)
                                  in summary["dropped_authors"].items()]
    write_json_atomic(folder / summary_name, summary)
    return {"task": task.index, "n_in": summary["n_in"], "kept": summary["kept"],
            "quarantined": len(summary["quarantine"])}


def read_summary(folder: Path, index: int) -> dict:
    return json.loads((folder / task_names(index)[1]).read_text())
