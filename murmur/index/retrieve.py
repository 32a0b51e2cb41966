"""Top-k retrieval for a chat turn or a mention: BM25, then a recency term, both configurable.

    score = bm25 / (best bm25 among the candidates) + recency_weight * 2 ** (-age / half_life)

The BM25 part lies in (0, 1], so `recency_weight` says how much one half-life of freshness is worth against
the best text match: 0 ranks by BM25 alone; 0.1 (the default) lets a fresh post pass a slightly better match
but never a far better one. Only the `index.candidates` best BM25 matches are re-ranked. A post with no time
gets no recency.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from murmur.index.base import Hit, PostIndex
from murmur.settings.index import IndexSettings


def retrieve(index: PostIndex, query: str, settings: IndexSettings | None = None, *, k: int | None = None,
             now: float | None = None, exclude: Iterable[str] = ()) -> list[Hit]:
    """The k posts to ground an answer in, best first. `now` (epoch seconds) defaults to the clock; posts in
    `exclude` (the turn's own post) are never returned. QueryError for a query over the length limit."""
    settings = settings or IndexSettings()
    k = settings.top_k if k is None else k
    exclude = set(exclude)
    candidates = [hit for hit in index.search(query, max(k, settings.candidates) + len(exclude))
                  if hit.post.id not in exclude]
    if not candidates or settings.recency_weight == 0:
        return candidates[:k]
    now = time.time() if now is None else now
    best = max(hit.bm25 for hit in candidates) or 1.0
    half_life = settings.recency_half_life_hours * 3600

    def ranked(hit: Hit) -> Hit:
        created = hit.post.created_at
        fresh = 0.0 if created is None else 2.0 ** (-max(0.0, now - created) / half_life)
        return Hit(hit.post, hit.bm25, hit.bm25 / best + settings.recency_weight * fresh)

    rescored = sorted((ranked(hit) for hit in candidates), key=lambda h: (-h.score, h.post.id))
    return rescored[:k]
