"""End to end: curate a small corpus, tokenize it, delete a post, `murmur data purge`, `murmur data audit`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from murmur.cli import main
from murmur.shards import TokenLoader, audit_deletions, read_manifest


THREADS = [
    ["Has anyone tried the new ramen place on fifth street downtown yet?",
     "Yes, the spicy miso bowl was excellent and the broth tasted like it cooked all day long",
     "Good to know, I will go there this weekend with my sister then",
     "Order the pork buns too, they are honestly the best thing on the whole menu"],
    ["What book are you reading at the moment, anything you would recommend?",
     "A long history of the printing press, surprisingly gripping for such a dry subject",
     "That sounds like something my father would love for his birthday next month"],
    ["The train was forty minutes late again this morning and nobody explained why",
     "Same here, I missed the first half of my meeting because of the signal failure",
     "They really should announce these delays earlier so people can plan around them"],
] * 4


def write_posts(path: Path) -> list[dict]:
    posts = []
    for t, thread in enumerate(THREADS):
        root = f"{t}00"
        for i, text in enumerate(thread):
            posts.append({"id": f"{t}0{i}", "text": f"{text} (thread {t})", "author_id": f"user{(i + t) % 2}{t}",
                          "created_at": f"2024-01-01T10:{t:02d}:{i:02d}Z", "conversation_id": root,
                          "in_reply_to_id": f"{t}0{i - 1}" if i else None})
    for k in range(30):
        posts.append({"id": f"9{k:03d}", "text": f"A standalone thought number {k} about the weather and coffee",
                      "author_id": "loner", "created_at": f"2024-01-02T10:00:{k:02d}Z"})
    path.write_text("".join(json.dumps(p) + "\n" for p in posts))
    return posts


def test_data_purge_reaches_token_shards(tmp_path, capsys):
    write_posts(tmp_path / "posts.jsonl")
    run = tmp_path / "run"
    assert main(["data", "--source", f"jsonl:{tmp_path / 'posts.jsonl'}", "--out", str(run / "data"),
                 "--quiet"]) == 0
    assert main(["tokenizer", "--data", str(run / "data"), "--out", str(run / "tokenizer"),
                 "--vocab-size", "300"]) == 0
    assert main(["tokenize", "--data", str(run / "data"), "--tokenizer", str(run / "tokenizer"),
                 "--out", str(run / "tokens"), "--shard-tokens", "300"]) == 0
    convs = pq.read_table(run / "data" / "conversations.parquet").to_pylist()
    target = next(c for c in convs if c["split"] == "train")
    turn = target["turns"][1]
    deleted_id, deleted_text = turn["post_ids"][0], turn["text"]
    before = read_manifest(run / "tokens")
    assert audit_deletions(run / "tokens", [deleted_id], [deleted_text])  # present before the purge

    late = tmp_path / "late.txt"
    late.write_text(f"post:{deleted_id}\n")
    capsys.readouterr()
    assert main(["data", "purge", str(run), "--deletions", str(late)]) == 0
    assert main(["data", "audit", str(run), "--deletions", str(late)]) == 0
    assert audit_deletions(run / "tokens", [deleted_id], [deleted_text]) == []

    after = read_manifest(run / "tokens")
    for kind in ("pretrain", "sft"):
        old, new = before["splits"][kind]["train"], after["splits"][kind]["train"]
        assert new["documents"] < old["documents"]
        changed = [a["file"] for a, b in zip(old["shards"], new["shards"]) if a["sha256"] != b["sha256"]]
        assert 0 < len(changed) < len(old["shards"])  # only the shards that held the thread
        assert all(a == b for a, b in zip(old["shards"], new["shards"]) if a["file"] not in changed)
    loader = TokenLoader(run / "tokens", seq_len=16, batch_size=4, loop=False)
    predicted = sum(int((b["targets"] != -100).sum()) for b in loader)
    assert predicted == after["splits"]["pretrain"]["train"]["tokens"] - 1
