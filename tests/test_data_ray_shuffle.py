"""Shuffles through files, checked without a cluster (plain functions): what M mappers write, a batch per
destination, every reducer reads back as exactly its share of every mapper's rows, in mapper order; a mapper
run again rewrites the same file; a step's files are deleted when forgotten."""

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.data.distributed.shuffle import Gather, forget, run_step, split_by, step_folder, step_path


def keyed(keys: list[int]) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.uint64()), "at": pa.array(np.arange(len(keys)), pa.int64())})


def scatter(parts: int, keys: list[int]) -> list:
    """A mapper: its rows split by key into `parts` destinations; its summary, the rows it had."""
    return [split_by(keyed(keys), "key", parts), len(keys)]


def gathered(table: pa.Table) -> list:
    return [table]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=40), min_size=1, max_size=4), st.integers(1, 5))
def test_reducers_read_back_their_share_of_every_mapper(tmp_path_factory, mappers, parts):
    folder = str(tmp_path_factory.mktemp("shuffle"))
    summaries = [run_step(scatter, (str(step_path(folder, "s", i)),), parts, keys) for i, keys in enumerate(mappers)]
    assert summaries == [[len(keys)] for keys in mappers]  # the summary comes back, the tables do not
    read = 0
    for j in range(parts):
        table = Gather(folder, "s", j, 0, len(mappers)).read()
        expected = pa.concat_tables([split_by(keyed(keys), "key", parts)[j] for keys in mappers])
        assert table.equals(expected)
        read += table.num_rows
    assert read == sum(len(keys) for keys in mappers)  # every row reached exactly one reducer
    # One mapper's own file, handed on whole.
    run_step(gathered, (str(step_path(folder, "own", 0)),), Gather(folder, "s", 0, 0, len(mappers)))
    assert Gather(folder, "own", 0, 0, 1).read().equals(Gather(folder, "s", 0, 0, len(mappers)).read())


def test_a_mapper_run_again_rewrites_its_file_and_forget_deletes_the_step(tmp_path):
    folder = str(tmp_path)
    path = str(step_path(folder, "s", 0))
    run_step(scatter, (path,), 3, [5, 6, 7, 8])
    first = step_path(folder, "s", 0).read_bytes()
    run_step(scatter, (path,), 3, [5, 6, 7, 8])
    assert step_path(folder, "s", 0).read_bytes() == first
    assert [p.name for p in step_folder(folder, "s").iterdir()] == ["000000.arrow"]  # no temporary left behind
    forget(folder, "s")
    assert not step_folder(folder, "s").exists()


def test_a_step_that_writes_nothing_returns_its_result_as_it_is(tmp_path):
    assert run_step(sorted, (), [3, 1, 2]) == [1, 2, 3]
