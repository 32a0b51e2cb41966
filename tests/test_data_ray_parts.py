"""The Ray global step's part files: row groups of bounded size (what the copying task holds at once), copied
into the staged outputs in group order, the canaries after the posts (no Ray needed: plain functions)."""

import pyarrow as pa
import pyarrow.parquet as pq

from murmur.data import canaries as canary_module
from murmur.data.distributed.parts import PART_ROWS, part_path, write_outputs, write_part
from murmur.data.records import CONVERSATION_SCHEMA, POST_SCHEMA, QUARANTINE_SCHEMA
from murmur.settings.data import DataSettings


def posts(first: int, n: int) -> pa.Table:
    return pa.Table.from_pylist([{"id": str(i), "author_id": f"a{i % 7}", "text": f"post {i}", "split": "train",
                                  "source": "jsonl:x", "root_id": str(i)} for i in range(first, first + n)],
                                schema=POST_SCHEMA)


def test_a_part_holds_row_groups_of_at_most_part_rows(tmp_path):
    tables = [posts(0, PART_ROWS + 5), posts(PART_ROWS + 5, 0), posts(PART_ROWS + 5, 2 * PART_ROWS)]
    path = tmp_path / "p.parquet"
    assert write_part(path, POST_SCHEMA, tables) == 3 * PART_ROWS + 5
    metadata = pq.ParquetFile(path).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert max(sizes) == PART_ROWS and sum(sizes) == 3 * PART_ROWS + 5
    assert pq.read_table(path).equals(pa.concat_tables(tables))


def test_outputs_are_the_parts_in_order_then_the_canaries(tmp_path):
    folder, work = tmp_path / "ray", tmp_path / "work"
    settings = DataSettings(sources=["jsonl:unused"], canaries=2)
    groups = [posts(0, 30), posts(30, 0), posts(30, 12)]
    for k, table in enumerate(groups):
        write_part(part_path(folder, "posts", k), POST_SCHEMA, [table])
        quarantined = [{"source": "jsonl:x", "line": k, "reason": "bad_json", "raw": None, "record_id": None}]
        write_part(part_path(folder, "quarantine", k), QUARANTINE_SCHEMA,
                   [pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA)])
    conversations = [{"id": str(j), "root_id": str(j), "split": "train", "turns": [], "post_ids": [str(j)]}
                     for j in range(2)]
    for j, row in enumerate(conversations):
        write_part(part_path(folder, "conversations", j), CONVERSATION_SCHEMA,
                   [pa.Table.from_pylist([row], schema=CONVERSATION_SCHEMA)])
    write_outputs(str(folder), str(work), len(groups), len(conversations), settings.model_dump_json())

    canaries = canary_module.canary_rows(canary_module.make_canaries(2, settings.canary_repeats, settings.seed))
    assert canaries
    expected = pa.concat_tables(groups + [pa.Table.from_pylist(canaries, schema=POST_SCHEMA)])
    assert pq.read_table(work / "posts.parquet").equals(expected)
    assert pq.read_table(work / "quarantine.parquet").column("line").to_pylist() == [0, 1, 2]
    assert pq.read_table(work / "conversations.parquet").column("id").to_pylist() == ["0", "1"]
