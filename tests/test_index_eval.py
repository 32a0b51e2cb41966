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


def run_with_threads(tmp_path):
    """An evaluable run whose posts hold THREADS (posts with the columns the index reads)."""
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
    return run


def test_eval_reports_parent_recall_when_the_run_has_an_index(tmp_path):
    run = run_with_threads(tmp_path)
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


def test_the_side_by_side_card_reuses_the_runs_parent_recall_for_the_other_models(tmp_path, monkeypatch):
    """The index's recall does not depend on the model: the card's other models take the run's figures
    (querying the index again cost the demo minutes) and still get the grounded probe the index enables."""
    from murmur.eval import runner
    from murmur.eval.compare import side_by_side
    from murmur.hf import save_hf_model
    from eval_fixtures import tiny_model, tokenizer, tokenizer_dir

    run = run_with_threads(tmp_path)
    settings = settings_from_dict({"run": {"dir": str(run)}, "index": {"recency_weight": 0}, "eval": {
        "ranking_examples": 0, "prompts": ["hello"], "sample_seeds": [0], "max_new_tokens": 2}})
    index_stage(settings, run)
    run_stage(settings, run)
    own = json.loads((run / "eval" / "results.json").read_text())["retrieval"]
    base = tmp_path / "base"
    save_hf_model(tiny_model(tokenizer().vocab_size, seed=7), base, tokenizer_dir=tokenizer_dir())

    def no_second_query(*args, **kwargs):
        raise AssertionError("the index was queried again for another model")

    monkeypatch.setattr(runner, "parent_retrieval", no_second_query)
    side_by_side(run, [("base", base)], settings.eval, label="finetuned", progress=lambda line: None)
    results = json.loads((run / "compare" / "base" / "eval" / "results.json").read_text())
    assert results["retrieval"] == own
    assert "grounded" in results
