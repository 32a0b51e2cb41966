"""What the Ray executor's readers rest on, checked without a cluster: a file read in byte ranges gives exactly
the records of reading it whole (line numbers included), and sources may be URLs of any fsspec store
(the in-memory one here; file:// on the cluster in tests/test_data_ray.py)."""

import gzip
import json
import sys
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import source_specs, write_corpus

from murmur.data import pipeline
from murmur.data.distributed.reading import count_spans, line_ends_between, number_lines, plan_ranges
from murmur.data.sources import FileReader, resolve_sources
from murmur.errors import MurmurError
from murmur.settings.data import DataSettings

LIMITS = DataSettings(max_record_bytes=64)


def ranged_records(source, split_bytes: int, data_settings: DataSettings) -> list:
    tasks = plan_ranges([source], split_bytes)
    tasks = number_lines(tasks, [line_ends_between(*span) for span in count_spans(tasks)])
    return [record for task in tasks for record in FileReader(task.source(), data_settings).records()]


LINES = st.lists(st.one_of(
    st.builds(lambda i, t: json.dumps({"id": str(i), "text": t}), st.integers(0, 10**6), st.text(max_size=30)),
    st.just(""), st.just('{"id": "broken'), st.binary(max_size=150).map(lambda b: b.decode("latin-1")),
    st.just("x" * 200),  # longer than max_record_bytes: cut, quarantined, read past
), max_size=40)


@settings(max_examples=40, deadline=None)
@given(lines=LINES, split_bytes=st.integers(1, 300), fmt=st.sampled_from(["jsonl", "text"]))
def test_byte_ranges_read_the_records_of_the_whole_file(tmp_path_factory, lines, split_bytes, fmt):
    path = tmp_path_factory.mktemp("ranges") / "posts.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1", "replace"))
    source = resolve_sources([f"{fmt}:{path}"])[0]
    whole = list(FileReader(source, LIMITS).records())
    assert ranged_records(source, split_bytes, LIMITS) == whole


def test_a_compressed_file_is_one_task(tmp_path):
    path = tmp_path / "posts.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "1", "text": "hello there"}\n' * 500))
    assert len(plan_ranges(resolve_sources([f"jsonl:{path}"]), 1024)) == 1


@pytest.fixture
def memory_store():
    fs = fsspec.filesystem("memory")
    root = f"/murmur-{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_sources_on_remote_storage_read_as_local_files_do(tmp_path, memory_store):
    fs, root = memory_store
    paths = write_corpus(tmp_path / "in")
    specs = [s for s in source_specs(paths) if not s.startswith("x-archive:")]
    remote_specs = []
    for spec in specs:
        fmt, _, local = spec.partition(":")
        fs.pipe(f"{root}/{Path(local).name}", Path(local).read_bytes())
        remote_specs.append(f"{fmt}:memory://{root}/{Path(local).name}")
    fs.pipe(f"{root}/direct-messages.js", b"never to be read")
    common = {"columns": {"id": "post", "text": "body", "author_id": "user", "created_at": "when"}, "workers": 1}
    local = pipeline.run(DataSettings(sources=specs, **common), tmp_path / "local", progress=False)
    remote = pipeline.run(DataSettings(sources=remote_specs, **common), tmp_path / "remote", progress=False)
    for key in ("in", "kept", "dropped", "quarantined", "splits", "conversations"):
        assert local[key] == remote[key], key
    for name in ("posts.parquet", "conversations.parquet"):
        a, b = (pq.read_table(folder / name) for folder in (tmp_path / "local", tmp_path / "remote"))
        assert a.drop_columns(["source"]).equals(b.drop_columns(["source"])) if "source" in a.column_names \
            else a.equals(b), name
    labels = set(pq.read_table(tmp_path / "remote" / "posts.parquet").column("source").to_pylist())
    assert all(label.split(":", 1)[1].startswith("memory://") for label in labels)
    # A glob over the store passes over direct messages; naming one is refused; a missing file is an error.
    assert not [f for f in resolve_sources([f"text:memory://{root}/*"]) if "direct" in f.label]
    with pytest.raises(MurmurError, match="direct messages are private"):
        resolve_sources([f"text:memory://{root}/direct-messages.js"])
    with pytest.raises(MurmurError, match="no file matches"):
        resolve_sources([f"jsonl:memory://{root}/missing.jsonl"])


def test_ranges_of_a_remote_file(memory_store):
    fs, root = memory_store
    body = "".join(f"line {i} of a remote log\n" if i % 7 else "\n" for i in range(300)).encode()
    fs.pipe(f"{root}/log.txt", body)
    source = resolve_sources([f"text:memory://{root}/log.txt"])[0]
    whole = list(FileReader(source, LIMITS).records())
    assert len(plan_ranges([source], 500)) > 5
    assert ranged_records(source, 500, LIMITS) == whole
