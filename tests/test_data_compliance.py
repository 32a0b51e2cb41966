"""Deletions: honoured at build time, purged from an existing run, and proven gone by the audit."""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import thread_tweets, tweet

from murmur.cli import main
from murmur.data import pipeline
from murmur.data.compliance import audit, load_deletions, purge
from murmur.settings.data import DataSettings

ROOT, BOB_1, BOB_2, ALICE_2, CAROL = (str(1_000_000_000_000_000_000 + i) for i in range(1, 6))


def write_posts(path: Path) -> None:
    import json

    extra = [tweet(7001, "Alice also says the farmers market opens at eight on Saturdays", author="alice"),
             tweet(7002, "A completely separate note about the library's new opening hours", author="dave"),
             tweet(7003, "The library's new opening hours, a completely separate note", author="erin")]
    path.write_text("\n".join(json.dumps(t) for t in thread_tweets() + extra) + "\n")


def all_output_bytes(out: Path) -> bytes:
    """Every value of every output file, as text, to search for ids."""
    chunks = []
    for name in ("posts.parquet", "conversations.parquet", "quarantine.parquet"):
        chunks.append(str(pq.read_table(out / name).to_pylist()).encode())
    return b"".join(chunks)


@pytest.fixture
def corpus(tmp_path):
    write_posts(tmp_path / "posts.jsonl")
    return tmp_path


def run(corpus, out, deletions=None):
    settings = DataSettings(sources=[f"x-api:{corpus / 'posts.jsonl'}"], workers=1,
                            deletions=str(deletions) if deletions else None)
    return pipeline.run(settings, out, progress=False)


def test_deleted_posts_and_accounts_vanish_at_build(corpus):
    deletions = corpus / "deletions.txt"
    deletions.write_text(f"post:{BOB_2}\naccount:carol\naccount:dave\nrestore account:dave\n")
    stats = run(corpus, corpus / "out", deletions)
    out = corpus / "out"
    assert stats["deleted"] == 2 and stats["in"] == stats["kept"] + sum(stats["dropped"].values())
    text = all_output_bytes(out)
    assert BOB_2.encode() not in text and CAROL.encode() not in text and b"carol" not in text
    assert b"7002" in text  # dave was restored: the latest event wins
    # The thread is cut where the deleted post stood: root -> bob's first reply, and alice's answer starts anew.
    posts = {p["id"]: p for p in pq.read_table(out / "posts.parquet").to_pylist()}
    assert posts[ALICE_2]["root_id"] == ALICE_2 and posts[ALICE_2]["in_reply_to_id"] is None
    conversations = pq.read_table(out / "conversations.parquet").to_pylist()
    assert [c["post_ids"] for c in conversations] == [[ROOT, BOB_1]]
    assert audit(out) == []  # the recorded deletion list is re-checked
    assert (out / "deletions.txt").read_text().count(f"post:{BOB_2}") == 1


def test_a_new_deletion_list_is_recorded_even_when_its_text_is_inside_an_older_one(corpus):
    out = corpus / "out"
    first, second = corpus / "first.txt", corpus / "second.txt"
    first.write_text("post:70021\n")  # no such post; its text contains the next list's
    second.write_text("post:7002\n")
    run(corpus, out, first)
    run(corpus, out, second)
    recorded = (out / "deletions.txt").read_text()
    assert "post:7002\n" in recorded.replace("post:70021", "") and b"7002" not in all_output_bytes(out)
    assert audit(out) == []
    run(corpus, out, second)  # the same list again changes nothing and is not recorded twice
    assert (out / "deletions.txt").read_text() == recorded


def test_audit_fails_loudly_when_a_deleted_post_is_planted_back(corpus):
    out = corpus / "out"
    deletions = corpus / "deletions.txt"
    deletions.write_text("post:7002\n")
    run(corpus, out, deletions)
    assert audit(out) == []
    posts = pq.read_table(out / "posts.parquet")
    planted = posts.slice(0, 1).to_pylist()[0] | {"id": "7002"}
    pq.write_table(pa.concat_tables([posts, pa.Table.from_pylist([planted], schema=posts.schema)]),
                   out / "posts.parquet")
    problems = audit(out)
    assert any("deleted post 7002" in p for p in problems)
    assert main(["data", "audit", str(out)]) == 1
    # The text of a deleted post under a new id is caught too (via its tombstone hash, not a stored text).
    original = [p | {"id": "9999", "text": "A completely separate note about the library's new opening hours"}
                for p in posts.slice(0, 1).to_pylist()]
    pq.write_table(pa.concat_tables([posts, pa.Table.from_pylist(original, schema=posts.schema)]),
                   out / "posts.parquet")
    assert any("text of a deleted post" in p for p in audit(out))


def test_purge_after_build_removes_new_deletions(corpus, capsys):
    out = corpus / "out"
    before = run(corpus, out)
    assert audit(out, load_deletions(None)) == []
    late = corpus / "late.txt"
    late.write_text(f"post:{BOB_1}\naccount:dave\n")
    assert audit(out, load_deletions(late))  # not yet purged: the audit sees them
    assert main(["data", "purge", str(out), "--deletions", str(late)]) == 0
    assert "purged" in capsys.readouterr().out
    text = all_output_bytes(out)
    assert BOB_1.encode() not in text and b"dave" not in text and b"7002" not in text
    assert audit(out) == []  # re-checks the recorded list, now including the late one
    assert main(["data", "audit", str(out), "--deletions", str(late)]) == 0
    import json

    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == before["kept"] - 2 and stats["deleted"] == 2
    assert stats["in"] == stats["kept"] + sum(stats["dropped"].values()) + stats["quarantined"]
    # The conversation is cut where bob's first reply stood: his second post and alice's answer remain a
    # conversation of their own; the branch through carol is intact.
    conversations = pq.read_table(out / "conversations.parquet").to_pylist()
    assert sorted(c["post_ids"] for c in conversations) == [[ROOT, CAROL], [BOB_2, ALICE_2]]
    result = purge(out, late)  # purging again changes nothing
    assert result["posts_removed"] == 0


def test_audit_and_purge_reach_the_token_shards(corpus, monkeypatch):
    from murmur import shards

    run_dir = corpus / "run"
    run(corpus, run_dir / "data")
    (run_dir / "tokens").mkdir()
    (run_dir / "tokens" / "manifest.json").write_text("{}")
    calls = []
    monkeypatch.setattr(shards, "audit_deletions",
                        lambda tokens, ids, texts: calls.append(("audit", set(ids), list(texts))) or [])
    monkeypatch.setattr(shards, "purge_documents",
                        lambda tokens, ids: calls.append(("purge", set(ids))) or {"documents_removed": 1})
    late = corpus / "late.txt"
    late.write_text("account:dave\n")
    summary = purge(run_dir, late)
    assert summary["tokens"] == {"documents_removed": 1}
    assert ("purge", {"7002"}) in calls
    assert ("audit", {"7002"}, ["A completely separate note about the library's new opening hours"]) in calls
    calls.clear()
    assert audit(run_dir) == []
    assert calls == [("audit", {"7002"}, [])]  # the account's post ids were recorded by the purge


def test_purging_a_thread_root_leaves_no_reference_to_it(corpus):
    out = corpus / "out"
    run(corpus, out)
    late = corpus / "late.txt"
    late.write_text(f"post:{ROOT}\n")
    purge(out, late)
    assert audit(out) == []
    posts = {p["id"]: p for p in pq.read_table(out / "posts.parquet").to_pylist()}
    assert posts[ALICE_2]["root_id"] == BOB_1 and posts[CAROL]["root_id"] == CAROL
    conversations = pq.read_table(out / "conversations.parquet").to_pylist()
    assert [(c["root_id"], c["post_ids"]) for c in conversations] == [(BOB_1, [BOB_1, BOB_2, ALICE_2])]


def test_a_rebuild_honours_deletions_purged_earlier(corpus):
    out = corpus / "out"
    run(corpus, out)
    late = corpus / "late.txt"
    late.write_text("post:7003\n")
    purge(out, late)
    settings = DataSettings(sources=[f"x-api:{corpus / 'posts.jsonl'}"], workers=1, min_turns=3)  # a new setting
    stats = pipeline.run(settings, out, progress=False)
    assert not stats.get("up_to_date") and stats["deleted"] == 1
    assert b"7003" not in all_output_bytes(out) and audit(out) == []
    assert pipeline.run(settings, out, progress=False)["up_to_date"]  # and the rebuild is stable
