"""`murmur data purge` and `murmur data audit` reach the post index, on both backends: a run is curated by the
real data stage and indexed by the real index stage; a purge removes the posts from the index too, and the
audit fails while the index still holds a deleted post."""

from __future__ import annotations

import json

import pytest
from data_corpus import thread_tweets, tweet
from index_fixtures import backend, fresh_schema, postgres_url  # noqa: F401 (fixtures)

from murmur.cli import main
from murmur.config import Settings
from murmur.data import pipeline
from murmur.data.compliance import purge as purge_data
from murmur.index import IndexedPost, open_index, run_stage
from murmur.settings.data import DataSettings

BOB_1 = str(1_000_000_000_000_000_002)
BOB_2 = str(1_000_000_000_000_000_003)


@pytest.fixture
def indexed_run(tmp_path, backend, request):  # noqa: F811 (fixture names)
    """A run folder with data/ from the data stage and index/ from the index stage, and its index settings."""
    extra = [tweet(7001, "Alice says the farmers market opens at eight on Saturdays", author="alice"),
             tweet(7002, "Dave has a separate note about the library's new opening hours", author="dave")]
    (tmp_path / "posts.jsonl").write_text("\n".join(json.dumps(t) for t in thread_tweets() + extra) + "\n")
    run = tmp_path / "run"
    pipeline.run(DataSettings(sources=[f"x-api:{tmp_path / 'posts.jsonl'}"], workers=1), run / "data",
                 progress=False)
    settings = Settings()
    if backend == "postgresql":
        settings.index.url = request.getfixturevalue("postgres_url")
        settings.index.pg_schema = fresh_schema()
    run_stage(settings, run)
    return run, settings.index


def indexed_ids(run, settings, query: str) -> set[str]:
    with open_index(run, settings) as index:
        return {hit.post.id for hit in index.search(query, limit=100)}


def test_data_purge_removes_posts_and_accounts_from_the_index(indexed_run, tmp_path, capsys):
    run, settings = indexed_run
    assert {BOB_1, "7002"} <= indexed_ids(run, settings, "chili library opening hours")
    late = tmp_path / "late.txt"
    late.write_text(f"post:{BOB_1}\naccount:dave\n")
    assert main(["data", "purge", str(run), "--deletions", str(late)]) == 0
    assert not {BOB_1, "7002"} & indexed_ids(run, settings, "chili library opening hours dave big pot")
    assert f"index ({settings.url and 'postgresql' or 'sqlite'}): removed 2 posts" in capsys.readouterr().out
    with open_index(run, settings) as index:
        assert index.get([BOB_1, "7002"]) == {}
        assert index.get([BOB_2])[BOB_2].in_reply_to_id is None  # no reference to the deleted post is left
        # A stream replaying the deleted post, or a new post of the deleted account, is refused.
        assert index.add([IndexedPost(BOB_1, "bob", "a big pot of chili"),
                          IndexedPost("7100", "dave", "dave is back")])["refused_deleted"] == 2
    assert main(["data", "audit", str(run)]) == 0
    assert main(["data", "audit", str(run / "data"), "--deletions", str(late)]) == 0


def test_data_audit_fails_while_the_index_holds_a_deleted_post(indexed_run, tmp_path, capsys):
    run, settings = indexed_run
    late = tmp_path / "late.txt"
    late.write_text(f"post:{BOB_1}\n")
    purge_data(run, late)  # the data folder alone, as a purge before the index existed would leave it
    capsys.readouterr()
    assert main(["data", "audit", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"index: post {BOB_1} is deleted but still indexed" in err and "no tombstone" in err
    assert main(["data", "purge", str(run), "--deletions", str(late)]) == 0  # purging again mends the index
    assert main(["data", "audit", str(run)]) == 0
    assert BOB_1 not in indexed_ids(run, settings, "chili")
