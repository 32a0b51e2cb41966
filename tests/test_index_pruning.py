"""The search scores as few posts as prove its order (MaxScore), on both backends: the top k equal a full BM25
scoring on random corpora with common and rare words, and a query of common words scores a bounded number of
posts (the newest of them) beside every post holding its rarer words."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from index_fixtures import backend, fresh_schema, make_index, postgres_url  # noqa: F401 (fixtures)
from test_index import reference_bm25

from murmur.index import IndexedPost
from murmur.index import base as index_base
from murmur.index.text import words

# Zipf-like: the first words land in most posts (their idf is floored), the last in one or two.
VOCABULARY = ["the", "a", "pier", "meetup", "today", "rain", "ferry", "kayak", "quokka", "zebra"]
WEIGHTS = [40, 25, 12, 8, 5, 4, 3, 2, 1, 1]


def significant(score: float) -> float:
    """A score to nine significant digits: the backends' sums may differ from the reference in the last bits."""
    return float(f"{score:.9g}")


def assert_a_true_top(hits, corpus: list[IndexedPost], query: str, limit: int) -> None:
    """The hits are a top `limit` of the reference scoring: the same scores in order, each hit's its own. Posts
    whose scores are equal in exact arithmetic may differ in the last bits (summed in another order), so
    which of them fills the last place, or comes first, is left to the floats."""
    scores = reference_bm25(corpus, list(dict.fromkeys(words(query))))
    best = sorted((significant(score) for score in scores.values()), reverse=True)[:limit]
    assert [significant(hit.bm25) for hit in hits] == best
    assert all(significant(scores[hit.post.id]) == significant(hit.bm25) for hit in hits)
    assert len({hit.post.id for hit in hits}) == len(hits)


def test_top_k_equals_a_full_scoring(make_index):
    # Words drawn with the Zipf-like weights, so that common words fill most posts.
    word = st.sampled_from([w for w, weight in zip(VOCABULARY, WEIGHTS) for _ in range(weight)])

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(texts=st.lists(st.lists(word, min_size=1, max_size=12), min_size=5, max_size=40),
           query=st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=5), limit=st.integers(1, 6))
    def check(texts, query, limit):
        corpus = [IndexedPost(f"p{i:02d}", "u", " ".join(text)) for i, text in enumerate(texts)]
        index = make_index()
        index.add(corpus)
        assert_a_true_top(index.search(" ".join(query), limit=limit), corpus, " ".join(query), limit)
        index.close()

    check()


def test_common_words_score_a_bounded_number_of_posts(make_index, monkeypatch):
    monkeypatch.setattr(index_base, "MAX_SCORED_POSTS", 5)
    index = make_index()
    # Oldest first: the two posts with the rare word, then twenty posts of the common word alone.
    posts = [IndexedPost(f"z{i}", "u", "zebra at the pier", float(i)) for i in range(2)]
    posts += [IndexedPost(f"c{i:02d}", "u", "the pier", float(10 + i)) for i in range(20)]
    index.add(posts)
    hits = index.search("the zebra pier", limit=10)
    # Every post with the rare word, then the newest five of the rest: seven posts scored, not twenty-two.
    assert [h.post.id for h in hits] == ["z0", "z1", "c15", "c16", "c17", "c18", "c19"]
    # A query the rare words decide alone is exact whatever the bound: here two posts prove the order.
    assert [h.post.id for h in index.search("zebra the", limit=2)] == ["z0", "z1"]
