"""Retrieval quality for the eval stage: does a held-out reply's text find the post it replied to?

For each sampled reply of the held-out split whose parent is in the index, the reply's text is the query
(the reply itself excluded from the results, its own time as "now"), and the parent's rank is recorded.
recall@k is the share of replies whose parent is among the first k results.
"""

from __future__ import annotations

import random
from pathlib import Path

from murmur.index.base import PostIndex
from murmur.index.retrieve import retrieve
from murmur.index.text import QueryError
from murmur.settings.index import IndexSettings


def parent_recall(index: PostIndex, data_dir: str | Path, settings: IndexSettings | None = None, *,
                  split: str = "test", ks: tuple[int, ...] = (1, 10), seed: int = 0) -> dict:
    """{"examples": n, "recall@1": ..., "recall@10": ...} over at most `settings.recall_examples` replies
    (a seeded sample); recall values are None when no reply qualifies."""
    import pyarrow.parquet as pq

    settings = settings or IndexSettings()
    table = pq.read_table(Path(data_dir) / "posts.parquet",
                          columns=["id", "text", "created_at", "in_reply_to_id", "split"]).to_pylist()
    replies = [row for row in table if row["split"] == split and row["in_reply_to_id"]]
    parents = index.get(row["in_reply_to_id"] for row in replies)
    replies = [row for row in replies if row["in_reply_to_id"] in parents]
    random.Random(seed).shuffle(replies)
    replies = replies[:settings.recall_examples]
    depth = max(ks)
    found = dict.fromkeys(ks, 0)
    used = 0
    for row in replies:
        now = row["created_at"].timestamp() if row["created_at"] else None
        try:
            hits = retrieve(index, row["text"], settings, k=depth, now=now, exclude=[row["id"]])
        except QueryError:
            continue  # a reply longer than the query limit is no fair test of retrieval
        used += 1
        ids = [hit.post.id for hit in hits]
        for k in ks:
            found[k] += row["in_reply_to_id"] in ids[:k]
    return {"examples": used, "split": split,
            **{f"recall@{k}": (found[k] / used if used else None) for k in ks}}
