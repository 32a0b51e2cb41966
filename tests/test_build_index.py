"""The index stage inside `murmur build`: it runs after data, is skipped when nothing it reads changed, is not
rebuilt for a setting that only changes queries, and a rebuild keeps deletions applied to the live index and
the mentions the assistant answered."""

from __future__ import annotations

from pathlib import Path

from index_fixtures import backend, fresh_schema, postgres_url  # noqa: F401 (fixtures)
from test_build import FakeStages, _build, _settings, corpus  # noqa: F401 (fixture)
from test_index import write_posts

from murmur.build import plan_build
from murmur.index import open_index

POSTS = [{"id": "a1", "author_id": "ann", "text": "the pier meetup moved to thursday"},
         {"id": "b1", "author_id": "bob", "text": "reply about the pier meetup", "in_reply_to_id": "a1",
          "conversation_id": "a1", "split": "test"},
         {"id": "c1", "author_id": "cat", "text": "a validation post about the lighthouse", "split": "validation"}]


def stages_with_the_real_index(fakes: FakeStages) -> dict:
    """Fake stages, but a data stage that writes a real posts.parquet, and the real index stage."""
    functions = fakes.functions()
    functions.pop("index")
    fake_data = functions["data"]

    def data(settings, run_dir):
        summary = fake_data(settings, run_dir)
        write_posts(Path(run_dir) / "data", POSTS)
        return summary
    functions["data"] = data
    return functions


def settings_for(tmp_path, corpus, backend, request, **index):  # noqa: F811 (fixture names)
    if backend == "postgresql":
        index = {"url": request.getfixturevalue("postgres_url"), "pg_schema": fresh_schema(), **index}
    return _settings(tmp_path, corpus, index=index)


def build_with(fakes, settings, **kw):
    from murmur.build import build
    from murmur.build_display import QuietDisplay

    return build(settings, functions=stages_with_the_real_index(fakes), display=QuietDisplay(), **kw)


def test_the_index_stage_runs_after_data_and_is_skipped_when_up_to_date(tmp_path, corpus):  # noqa: F811
    fakes = FakeStages()
    settings = _settings(tmp_path, corpus)
    result = build_with(fakes, settings)
    assert "index" in result.ran() and "index" not in fakes.calls  # the real stage ran, not a fake
    summary = next(s["summary"] for s in result.stages if s["stage"] == "index")
    assert summary["posts"] == 3 and summary["backend"] == "sqlite"
    with open_index(tmp_path / "run", settings.index) as index:
        assert sorted(h.post.id for h in index.search("pier meetup")) == ["a1", "b1"]

    fakes.calls.clear()
    result = build_with(fakes, settings)
    assert result.ran() == [] and "index" in result.skipped()
    # Settings that change how the index is queried, not what it holds, never rebuild it; those the parent
    # recall depends on rerun the evaluation.
    plan = plan_build(_settings(tmp_path, corpus, index={"top_k": 3, "poll_interval_s": 1.0, "batch_size": 7}))
    assert [s.stage.name for s in plan.steps if s.action == "run"] == []
    plan = plan_build(_settings(tmp_path, corpus, index={"recency_weight": 0.5}))
    assert [s.stage.name for s in plan.steps if s.action == "run"] == ["eval"]
    plan = plan_build(_settings(tmp_path, corpus, index={"splits": ["train"]}))
    assert [s.stage.name for s in plan.steps if s.action == "run"] == ["index", "eval"]
    assert "index.splits" in plan.step("index").reason


def test_a_rebuild_keeps_deletions_applied_to_the_live_index(tmp_path, corpus, backend, request):  # noqa: F811
    fakes = FakeStages()
    settings = settings_for(tmp_path, corpus, backend, request)
    build_with(fakes, settings)
    with open_index(tmp_path / "run", settings.index) as index:
        assert sorted(index.get(["a1", "b1", "c1"])) == ["a1", "b1", "c1"]
        index.delete(posts=["a1"])  # as `murmur index --follow` applies a stream's delete event
        # The assistant answered three mentions; one's author, then another mention, are deleted later.
        for mention, author in (("m1", "dan"), ("m2", "eve"), ("m3", "fay")):
            assert index.record_answer(mention, author, {"reply": f"reply to {mention}"})
        index.delete(accounts=["eve"])
    with open_index(tmp_path / "run", settings.index) as index:
        index.delete(posts=["m3"])
    # A changed index setting rebuilds the index from posts.parquet, which still holds a1.
    rebuilt = settings.model_copy(deep=True)
    rebuilt.index.splits = ["train", "test"]
    result = build_with(fakes, rebuilt)
    assert "index" in result.ran()
    with open_index(tmp_path / "run", rebuilt.index) as index:
        assert sorted(index.get(["a1", "b1", "c1"])) == ["b1"]
        assert "a1" not in {h.post.id for h in index.search("pier meetup thursday", limit=50)}
        assert "a1" in index.tombstones("post")
        # Answered mentions survive the rebuild (a retry is still answered once), the deleted ones do not.
        assert index.answers() == [("m1", "dan", {"reply": "reply to m1"})]
        assert index.answer_of("m1") == {"reply": "reply to m1"} and index.answer_of("m3") is None
