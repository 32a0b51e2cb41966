"""The data stage end to end on a tiny corpus with every kind of record, good and bad."""

import itertools
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import source_specs, write_corpus

from murmur.cli import main
from murmur.data import pipeline
from murmur.errors import MurmurError
from murmur.settings.data import DataSettings

COLUMNS = {"id": "post", "text": "body", "author_id": "user", "created_at": "when"}


def settings_for(paths, **extra):
    return DataSettings(sources=source_specs(paths), workers=1, columns=COLUMNS, **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(root / "in")
    out = root / "out"
    stats = pipeline.run(settings_for(paths, canaries=3, canary_repeats=[4, 1, 0]), out, progress=False)
    return paths, out, stats


def test_every_record_is_accounted_for(built):
    paths, out, _ = built
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["in"] == on_disk["kept"] + sum(on_disk["dropped"].values()) + on_disk["quarantined"]
    assert on_disk["in"] == sum(on_disk["in_by_source"].values())
    assert on_disk["in_by_source"][f"x-api:{paths['jsonl_gz']}"] == 24
    assert on_disk["in_by_source"][f"x-api:{paths['envelope']}"] == 5
    assert f"jsonl:{paths['empty']}" not in on_disk["in_by_source"]  # an empty file has no records
    posts = pq.read_table(out / "posts.parquet").to_pylist()
    assert len([p for p in posts if p["source"] != "canary:"]) == on_disk["kept"]
    assert on_disk["dropped"] == {"author_repeat": 5, "duplicate": 1, "hashtag_stuffing": 1, "language": 1,
                                  "link_only": 1, "near_duplicate": 1, "repeated_characters": 1, "retweet": 1}
    assert on_disk["quarantine_reasons"] == {"invalid_utf8": 1, "malformed_json": 1, "no_text": 2, "too_large": 1,
                                             "truncated_or_corrupt_file": 1}


def test_bad_records_are_quarantined_with_source_line_and_reason(built):
    paths, out, _ = built
    rows = pq.read_table(out / "quarantine.parquet").to_pylist()
    by_reason = {}
    for row in rows:
        by_reason.setdefault(row["reason"].split(":")[0], []).append(row)
    jsonl = f"x-api:{paths['jsonl_gz']}"
    assert [(r["source"], r["line"]) for r in by_reason["malformed_json"]] == [(jsonl, 14)]
    assert [(r["source"], r["line"]) for r in by_reason["too_large"]] == [(jsonl, 15)]
    assert [(r["source"], r["line"]) for r in by_reason["invalid_utf8"]] == [(jsonl, 24)]
    assert {(r["record_id"]) for r in by_reason["no_text"]} == {"3011", "c2"}
    truncated = by_reason["truncated_or_corrupt_file"]
    assert len(truncated) == 1 and truncated[0]["source"] == f"jsonl:{paths['truncated']}"
    assert all(len(r["raw"]) <= 200 for r in rows)


def test_posts_are_cleaned_and_filtered(built):
    _, out, _ = built
    posts = {p["id"]: p for p in pq.read_table(out / "posts.parquet").to_pylist()}
    assert "2001" not in posts and posts["2002"]["text"] == "Original thoughts on sourdough baking"  # retweet
    assert posts["2003"]["text"].startswith("This text is truncated in the text field but complete in the note")
    assert posts["2004"]["text"] == "Mail me at <email> or call <phone>, card <card> from <ip>"
    assert posts["2005"]["text"] == "Check this out example.org"
    assert "3001" in posts and "3002" not in posts  # exact duplicate: the earlier one stays
    assert "3003" in posts and "3004" not in posts  # near duplicate
    assert not {"3005", "3006", "3007", "3008"} & posts.keys()  # link-only, hashtags, repeated chars, French
    assert "3012" in posts and "3013" in posts  # an unknown field and a two-letter reply are fine
    assert not any(p["author_id"] == "trent" for p in posts.values())  # the same text five times
    assert {"g0", "g1", "g2", "5001", "5002", "c1", "lines.txt:1", "lines.txt:3"} <= posts.keys()
    assert posts["5002"]["author_id"] == "777" and posts["5002"]["text"] == "replying from the archive with care"
    assert posts["1000000000000000002"]["text"] == "A big pot of chili, always a winner"
    assert str(posts["5001"]["created_at"]) == "2018-10-10 20:19:24+00:00"


def test_conversations_and_split_by_root(built):
    _, out, stats = built
    posts = {p["id"]: p for p in pq.read_table(out / "posts.parquet").to_pylist()}
    conversations = pq.read_table(out / "conversations.parquet").to_pylist()
    root = "1000000000000000001"
    assert sorted(len(c["turns"]) for c in conversations if c["root_id"] == root) == [2, 3]
    for c in conversations:
        assert all(posts[pid]["split"] == c["split"] and posts[pid]["root_id"] == c["root_id"] for pid in c["post_ids"])
        speakers = [t["speaker"] for t in c["turns"]]
        assert all(a != b for a, b in itertools.pairwise(speakers))
    assert posts["5002"]["root_id"] == "5001"
    assert sum(stats["splits"].values()) == stats["kept"]  # canaries are not counted as kept input


def test_canaries_are_planted_in_train_with_controls(built):
    _, out, stats = built
    document = json.loads((out / "canaries.json").read_text())
    repeats = [c["repeats"] for c in document["canaries"]]
    assert repeats == [4, 1, 0] and [c["inserted"] for c in document["canaries"]] == [True, True, False]
    texts = [p["text"] for p in pq.read_table(out / "posts.parquet").to_pylist() if p["split"] == "train"]
    for canary in document["canaries"]:
        assert canary["text"] == f"{canary['prefix']} {canary['secret']}"
        assert texts.count(canary["text"]) == canary["repeats"]
    assert stats["canaries_planted"] == 5


def test_rerun_is_up_to_date_and_a_crash_leaves_nothing_complete(built, tmp_path, monkeypatch):
    paths, out, _ = built
    assert pipeline.run(settings_for(paths, canaries=3, canary_repeats=[4, 1, 0]), out, progress=False)["up_to_date"]

    fresh = tmp_path / "fresh"
    calls = []
    real = pipeline._global_step

    def crash(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_global_step", crash)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(settings_for(paths), fresh, progress=False)
    assert not (fresh / "stats.json").exists() and not (fresh / "posts.parquet").exists()
    spilled = sorted(p.name for p in fresh.glob(".work-*/batch-*.json"))
    assert spilled  # the per-batch work survived the crash ...

    processed = []
    monkeypatch.setattr(pipeline, "_global_step", real)
    monkeypatch.setattr(pipeline, "_spill", lambda work, result: processed.append(result.index))
    stats = pipeline.run(settings_for(paths), fresh, progress=False)
    assert processed == []  # ... and is reused, not redone
    assert stats["kept"] == json.loads((out / "stats.json").read_text())["kept"]
    assert not list(fresh.glob(".work-*"))


def test_chitchat_turns_become_reply_chains(tmp_path):
    corpus = {"conv1": {"messages": [
        [{"text": "Hello there", "timestamp": "2018-05-02T19:38:15Z", "sender": "s1"},
         {"text": "How are you doing today?", "timestamp": "2018-05-02T19:38:20Z", "sender": "s1"}],
        [{"text": "im doing good, thanks for asking", "timestamp": "2018-05-02T19:38:29Z", "sender": "s2"}],
        [{"text": "Glad to hear it", "timestamp": "2018-05-02T19:39:00Z", "sender": "s1"}]]}}
    (tmp_path / "dataset.json").write_text(json.dumps(corpus))
    stats = pipeline.run(DataSettings(sources=[f"chitchat:{tmp_path / 'dataset.json'}"], workers=1),
                         tmp_path / "out", progress=False)
    assert stats["in"] == 3 and stats["kept"] == 3
    posts = pq.read_table(tmp_path / "out" / "posts.parquet").to_pylist()
    assert [(p["id"], p["in_reply_to_id"], p["author_id"]) for p in posts] == [
        ("conv1-0", None, "s1"), ("conv1-1", "conv1-0", "s2"), ("conv1-2", "conv1-1", "s1")]
    assert posts[0]["text"] == "Hello there\nHow are you doing today?"
    [conversation] = pq.read_table(tmp_path / "out" / "conversations.parquet").to_pylist()
    assert [t["speaker"] for t in conversation["turns"]] == ["user1", "user2", "user1"]


def test_missing_file_is_an_error_before_any_work(tmp_path):
    with pytest.raises(MurmurError, match="not found"):
        pipeline.run(DataSettings(sources=[f"jsonl:{tmp_path / 'absent.jsonl'}"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MurmurError, match="FORMAT:PATH"):
        pipeline.run(DataSettings(sources=["tweets.json"]), tmp_path / "out")


def test_cli_runs_the_stage_and_explains_errors(tmp_path, capsys):
    (tmp_path / "posts.txt").write_text("A plain post about the weather today\nAnother post about lunch\n")
    assert main(["data", "--source", f"text:{tmp_path}/*.txt", "--out", str(tmp_path / "out"),
                 "--set", "data.workers=1"]) == 0
    assert "kept" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kept"] == 2
    assert main(["data", "--source", "text:/no/such/file.txt", "--out", str(tmp_path / "o2")]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--executor", "spark"])
    assert exit_info.value.code == 2


def test_parquet_and_envelope_lines(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"id": [1790000000000000001, 1790000000000000002],
                             "text": ["A parquet post about the harbour at dawn", None],
                             "author_id": ["p1", "p2"]}), tmp_path / "posts.parquet")
    envelopes = [{"data": [{"id": "11", "text": "First page post about cheese", "author_id": "e1"}]},
                 {"data": {"id": "12", "text": "Second page post about bread", "author_id": "e2"}}]
    (tmp_path / "pages.jsonl").write_text("\n".join(json.dumps(e) for e in envelopes) + "\n")
    stats = pipeline.run(DataSettings(sources=[f"parquet:{tmp_path / 'posts.parquet'}",
                                               f"x-api:{tmp_path / 'pages.jsonl'}"], workers=1),
                         tmp_path / "out", progress=False)
    assert (stats["in"], stats["kept"], stats["quarantined"]) == (4, 3, 1)
    ids = pq.read_table(tmp_path / "out" / "posts.parquet").column("id").to_pylist()
    assert ids == ["1790000000000000001", "11", "12"]  # 64-bit ids stay exact strings


def test_thread_buckets_do_not_change_conversations(built, tmp_path, monkeypatch):
    paths, out, _ = built
    monkeypatch.setattr(pipeline, "POSTS_PER_BUCKET", 3)  # many buckets for a tiny corpus
    pipeline.run(settings_for(paths, canaries=3, canary_repeats=[4, 1, 0]), tmp_path / "bucketed", progress=False)

    def rows(folder):
        return sorted(map(str, pq.read_table(folder / "conversations.parquet").to_pylist()))
    assert rows(tmp_path / "bucketed") == rows(out)
    assert pq.read_table(tmp_path / "bucketed" / "posts.parquet").equals(pq.read_table(out / "posts.parquet"))


def test_truncated_zstd_is_quarantined_not_silently_empty(tmp_path):
    import zstandard

    lines = "".join(json.dumps({"id": str(i), "text": f"post {i} {'abcdefghij'[i % 10] * 5}", "author_id": "z"}) + "\n"
                    for i in range(3000)).encode()
    frames = zstandard.ZstdCompressor().compress(lines[:40_000]) + zstandard.ZstdCompressor().compress(lines[40_000:])
    (tmp_path / "whole.jsonl.zst").write_bytes(frames)
    (tmp_path / "cut.jsonl.zst").write_bytes(frames[: len(frames) - 50])
    settings = {"workers": 1, "near_dedup": False, "languages": [], "dedup_min_chars": 1000}
    whole = pipeline.run(DataSettings(sources=[f"jsonl:{tmp_path / 'whole.jsonl.zst'}"], **settings),
                         tmp_path / "whole", progress=False)
    assert (whole["in"], whole["quarantined"]) == (3000, 0)  # both frames read
    cut = pipeline.run(DataSettings(sources=[f"jsonl:{tmp_path / 'cut.jsonl.zst'}"], **settings),
                       tmp_path / "cut", progress=False)
    assert cut["quarantine_reasons"] == {"truncated_or_corrupt_file": 1}
    assert cut["in"] == cut["kept"] + cut["quarantined"] and cut["kept"] < 3000
