"""The grounded-answer probe: planted facts found among held-out posts, answers scored with retrieval on and
off; checked with scripted models whose behaviour is known (one reads its context, one ignores it)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from assistant_fixtures import ScriptedEngine
from serve_fixtures import make_model, tokenizer  # noqa: F401 (fixture)

from murmur.eval.grounded import FACTS, contains, grounded_probe, held_out_posts

pytestmark = pytest.mark.usefixtures("one_thread")


class ReadingEngine(ScriptedEngine):
    """Answers with the first post shown in its prompt, or 'no idea' when it was shown none."""

    def submit(self, prompt_ids, params, sink, request_id=None, prefix_len=0) -> str:
        prompt = self.tokenizer.decode(prompt_ids)
        self.reply = prompt.split("Posts from the network")[1].split("\n")[1] if "Posts from the network" in prompt \
            else "no idea"
        return super().submit(prompt_ids, params, sink, request_id, prefix_len)


class IgnoringEngine(ScriptedEngine):
    reply = "I think it is on Monday at the old hall"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    texts = [f"post {i} about the weather, the pier, the market and the bus to town" for i in range(300)]
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(300)], "author_id": [f"a{i % 7}" for i in range(300)],
                             "text": texts, "split": ["test" if i % 3 else "train" for i in range(300)]}),
                   folder / "posts.parquet")
    return folder


def test_contains_needs_every_answer_word():
    assert contains("It is on THURSDAY, I heard.", "Thursday")
    assert contains("meet at Harbor Park", "harbor park") and not contains("meet at the park", "Harbor park")
    assert not contains("thursdays are fun", "Thursday")


def test_a_model_that_reads_its_context_scores_only_with_retrieval(tokenizer, data_dir):
    posts = held_out_posts(data_dir, limit=150)
    assert len(posts) == 150 and all(p.id.startswith("t") for p in posts)
    engine = ReadingEngine(make_model(tokenizer.vocab_size, max_seq_len=1024), tokenizer, max_batch_size=8)
    result = grounded_probe(engine, posts)
    assert result["questions"] == len(FACTS) and result["distractors"] == 150
    assert result["retrieval_found"] == 1.0
    assert (result["share_on"], result["share_off"]) == (1.0, 0.0)
    first = result["examples"][0]
    assert "Update: the Pier 7 meetup moved to Thursday." in first["on"] and first["off"] == "no idea"


def test_a_model_that_ignores_its_context_scores_the_same_both_ways(tokenizer, data_dir):
    engine = IgnoringEngine(make_model(tokenizer.vocab_size, max_seq_len=1024), tokenizer, max_batch_size=8)
    result = grounded_probe(engine, held_out_posts(data_dir, limit=50))
    assert result["share_on"] == result["share_off"] == 0.0
    assert result["retrieval_found"] == 1.0  # retrieval did its part; the model did not use it


def test_murmur_eval_runs_the_probe_when_the_run_has_an_index(tmp_path):
    import json

    from eval_fixtures import make_run

    from murmur.config import settings_from_dict
    from murmur.eval.runner import run_stage
    from murmur.index import run_stage as index_stage

    import pyarrow.parquet as pq
    from test_index import write_posts

    run = make_run(tmp_path)
    stats = (run / "data" / "stats.json").read_text()
    write_posts(run / "data", [{k: r[k] for k in ("id", "author_id", "text", "split")}
                               for r in pq.read_table(run / "data" / "posts.parquet").to_pylist()])
    (run / "data" / "stats.json").write_text(stats)  # the posts' full schema, as the index stage reads it
    settings = settings_from_dict({"run": {"dir": str(run)}, "eval": {
        "ranking_examples": 0, "prompts": ["hello"], "sample_seeds": [0], "max_new_tokens": 2}})
    index_stage(settings, run)
    run_stage(settings, run)
    grounded = json.loads((run / "eval" / "results.json").read_text())["grounded"]
    assert grounded["questions"] == len(FACTS) and len(grounded["examples"]) == len(FACTS)
    # The tiny model's 256-token context holds few (or no) posts beside the question and the reply's room:
    # what was shown is reported, whatever it is.
    assert 0.0 <= grounded["retrieval_found"] <= 1.0
    for example in grounded["examples"]:
        assert example["on_correct"] == contains(example["on"], example["answer"])
        assert example["off_correct"] == contains(example["off"], example["answer"])
    assert grounded["share_on"] == sum(e["on_correct"] for e in grounded["examples"]) / len(FACTS)
