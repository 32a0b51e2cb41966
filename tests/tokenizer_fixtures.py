"""Tiny data folders in the data stage's Parquet schema, for the tokenizer and shard tests."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("hello world coffee morning train late again weekend music concert tickets sold out rain umbrella "
         "garden tomatoes finally ripe café naïve déjà vu 你好 世界 こんにちは Привет мир مرحبا 😀 🎉 🚆 ☕").split()

TURNS = pa.list_(pa.struct([("speaker", pa.string()), ("text", pa.string()), ("post_ids", pa.list_(pa.string()))]))


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "!", "?", ""])


def write_data_dir(directory: Path, conversations: int = 60, loose_posts: int = 40, seed: int = 0,
                   splits=("train", "train", "train", "validation")) -> dict:
    """posts.parquet + conversations.parquet: threads of 2-4 turns by two speakers, plus loose posts."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    posts = {"id": [], "author_id": [], "text": [], "conversation_id": [], "in_reply_to_id": [], "split": [],
             "source": []}
    convs = {"id": [], "root_id": [], "split": [], "turns": [], "post_ids": []}
    n = 0
    for c in range(conversations):
        split = splits[c % len(splits)]
        turns, ids = [], []
        for t in range(rng.randint(2, 4)):
            pid = f"p{n}"
            n += 1
            text = sentence(rng, rng.randint(3, 12))
            speaker = "A" if t % 2 == 0 else "B"
            posts["id"].append(pid)
            posts["author_id"].append(f"u{speaker}{c}")
            posts["text"].append(text)
            posts["conversation_id"].append(f"c{c}")
            posts["in_reply_to_id"].append(ids[-1] if ids else None)
            posts["split"].append(split)
            posts["source"].append("jsonl:test")
            turns.append({"speaker": speaker, "text": text, "post_ids": [pid]})
            ids.append(pid)
        convs["id"].append(f"c{c}")
        convs["root_id"].append(ids[0])
        convs["split"].append(split)
        convs["turns"].append(turns)
        convs["post_ids"].append(ids)
    for i in range(loose_posts):
        posts["id"].append(f"p{n}")
        n += 1
        posts["author_id"].append("loner")
        posts["text"].append(sentence(rng, rng.randint(4, 16)))
        posts["conversation_id"].append(None)
        posts["in_reply_to_id"].append(None)
        posts["split"].append(splits[i % len(splits)])
        posts["source"].append("jsonl:test")
    pq.write_table(pa.table(posts), directory / "posts.parquet")
    pq.write_table(pa.table({"id": convs["id"], "root_id": convs["root_id"], "split": convs["split"],
                             "turns": pa.array(convs["turns"], TURNS),
                             "post_ids": pa.array(convs["post_ids"], pa.list_(pa.string()))}),
                   directory / "conversations.parquet")
    return {"posts": posts, "conversations": convs}
