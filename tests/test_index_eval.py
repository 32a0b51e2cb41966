"""The eval stage scores the post index when the run has one: recall@1/@10 of held-out replies' parents, in
results.json, the stage summary and the report card."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from eval_fixtures import make_run
from test_index import write_posts

from murmur.config import settings_from_dict
from murmur.eval.runner import run_stage
from murmur.index import run_stage as index_stage

pytestmark = pytest.mark.usefixtures("one_thread")

# Three held-out replies whose parents are indexed: two share their words with their parent, one none.
THREADS = [
    ("q1", "who wants to go kayaking on the river saturday", "r1", "kayaking on the river sounds great"),
    ("q2", "best ramen place downtown", "r2", "the ramen place downtown on fifth"),
    ("q3", "a post about gardening tomatoes", "r3", "ramen downtown river kayaking"),
]


def test_eval_reports_parent_recall_when_the_run_has_an_index(tmp_path):
    run = make_run(tmp_path)
    rows = [{"id": r["id"], "author_id": r["author_id"], "text": r["text"], "split": r["split"]}
            for r in pq.read_table(run / "data" / "posts.parquet").to_pylist()]
    for parent, parent_text, reply, reply_text in THREADS:
        rows += [{"id": parent, "author_id": "a", "text": parent_text},
                 {"id": reply, "author_id": "b", "text": reply_text, "in_reply_to_id": parent,
                  "conversation_id": parent, "split": "test"}]
    stats = (run / "data" / "stats.json").read_text()
    write_posts(run / "data", rows)
    (run / "data" / "stats.json").write_text(stats)
    settings = settings_from_dict({"run": {"dir": str(run)}, "index": {"recency_weight": 0}, "eval": {
        "ranking_examples": 0, "prompts": ["hello"], "sample_seeds": [0], "max_new_tokens": 2}})

    run_stage(settings, run)  # no index yet: nothing about retrieval
    assert "retrieval" not in json.loads((run / "eval" / "results.json").read_text())

    index_stage(settings, run)
    summary = run_stage(settings, run)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["retrieval"] == {"examples": 3, "split": "test", "recall@1": pytest.approx(2 / 3),
                                    "recall@10": pytest.approx(2 / 3)}
    assert summary["retrieval_recall@10"] == pytest.approx(2 / 3)
    report = (run / "report" / "report.md").read_text()
    assert "| parent retrieval recall@1 | 0.667 |" in report
    assert "## Retrieval from the post index (test split)" in report and "Each of 3 held-out replies" in report
