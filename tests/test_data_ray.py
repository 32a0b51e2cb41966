"""The Ray Data executor produces exactly the local executor's outputs (a local Ray instance, a local pool)."""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import source_specs, write_corpus

from murmur.data import pipeline
from murmur.settings.data import DataSettings

pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_and_local_outputs_are_identical(tmp_path):
    paths = write_corpus(tmp_path / "in")
    columns = {"id": "post", "text": "body", "author_id": "user", "created_at": "when"}
    common = {"sources": source_specs(paths), "columns": columns, "batch_size": 16, "canaries": 2}
    local = pipeline.run(DataSettings(**common, workers=2), tmp_path / "local", progress=False)  # a process pool
    remote = pipeline.run(DataSettings(**common, workers=1, executor="ray"), tmp_path / "ray", progress=False)
    assert local["in"] > 16 * 3  # several batches went through Ray
    for key in ("in", "kept", "dropped", "quarantined", "splits", "conversations"):
        assert local[key] == remote[key]
    for name in ("posts.parquet", "conversations.parquet", "quarantine.parquet"):
        assert pq.read_table(tmp_path / "local" / name).equals(pq.read_table(tmp_path / "ray" / name)), name
    assert (tmp_path / "local" / "canaries.json").read_text() == (tmp_path / "ray" / "canaries.json").read_text()
