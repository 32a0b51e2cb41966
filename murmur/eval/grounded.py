"""The grounded-answer probe: does the model use what retrieval gives it?

Facts are planted in held-out posts ("the Pier 7 meetup moved to Thursday" added to a test-split post's
text), those posts are indexed among other held-out posts (distractors), and the model is asked a question
about each fact twice, greedily: once with the posts retrieved for the question in its prompt (the grounding
`murmur serve` does), once without. An answer contains the fact when every word of the fact's answer
("thursday") is among its words (folded as the index folds them). A model that reads its context scores
higher with retrieval on; one that does not scores about the same both ways; off, a model can only guess.

The probe builds its own throwaway SQLite index in a temporary folder, so the run's own index (SQLite or
PostgreSQL) is never written to.
"""

from __future__ import annotations


import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from murmur.assistant.grounding import ground
from murmur.index.base import IndexedPost
from murmur.index.sqlite import SqliteIndex
from murmur.index.text import words
from murmur.infer.sampling import SamplingParams
from murmur.settings.assistant import AssistantSettings
from murmur.settings.index import IndexSettings


@dataclass(frozen=True)
class Fact:
    statement: str  # planted in a held-out post
    question: str  # asked of the model
    answer: str  # words an answer must contain


FACTS = [
    Fact("the Pier 7 meetup moved to Thursday", "When is the Pier 7 meetup?", "Thursday"),
    Fact("the Elm Street bakery now opens at 6am", "What time does the Elm Street bakery open?", "6am"),
    Fact("the river cleanup meets at Harbor Park", "Where does the river cleanup meet?", "Harbor"),
    Fact("the book club is reading Dune this month", "What is the book club reading this month?", "Dune"),
    Fact("the night market was called off because of the hailstorm", "Why was the night market called off?",
         "hailstorm"),
    Fact("bus line 42 now runs to the airport", "Which bus line runs to the airport now?", "42"),
    Fact("tickets for the choir concert cost 12 euros", "How much are tickets for the choir concert?", "12"),
    Fact("Priya won the chess tournament at the library", "Who won the chess tournament at the library?", "Priya"),
]
DISTRACTORS = 2000  # held-out posts indexed beside the planted ones


def contains(answer: str, expected: str) -> bool:
    """Whether every word of `expected` is a word of `answer` (case and accents folded)."""
    said = set(words(answer))
    return all(word in said for word in words(expected))


def held_out_posts(data_dir: str | Path, split: str = "test", limit: int = DISTRACTORS, seed: int = 0
                   ) -> list[IndexedPost]:
    """Up to `limit` posts of one split (a fixed seeded sample), as the index holds posts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data_dir) / "posts.parquet", columns=["id", "author_id", "text", "split"])
    table = table.filter(pc.equal(table["split"], split))
    rows = [IndexedPost(str(i), str(a), t) for i, a, t in zip(table["id"].to_pylist(), table["author_id"].to_pylist(),
                                                              table["text"].to_pylist()) if t]
    if len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    return rows


def plant(posts: list[IndexedPost], facts: list[Fact], seed: int = 0) -> list[IndexedPost]:
    """The posts with each fact appended to one of them (distinct posts, seeded); posts are made up when
    there are fewer held-out posts than facts."""
    posts = list(posts)
    while len(posts) < len(facts):
        posts.append(IndexedPost(f"probe-{len(posts)}", "probe", "news from the neighbourhood"))
    chosen = random.Random(seed).sample(range(len(posts)), len(facts))
    for fact, at in zip(facts, chosen):
        post = posts[at]
        posts[at] = IndexedPost(post.id, post.author_id, f"{post.text.rstrip()} Update: {fact.statement}.")
    return posts


def grounded_probe(engine, posts: list[IndexedPost], facts: list[Fact] = FACTS, *, max_new_tokens: int = 48,
                   seed: int = 0, index_settings: IndexSettings | None = None,
                   settings: AssistantSettings | None = None) -> dict:
    """Plant `facts` in `posts`, ask each question with retrieval on and off (greedy), and report the share
    of answers containing the fact both ways, whether retrieval found the planted post, and every answer.
    `engine` is a murmur.infer Engine (or anything with its generate, encode_prompt and max_seq_len)."""
    index_settings = index_settings or IndexSettings(recency_weight=0, top_k=4)
    settings = settings or AssistantSettings(post_chars=240)
    planted = plant(posts, facts, seed)
    where = {fact.statement: next(p.id for p in planted if p.text.endswith(f"Update: {fact.statement}."))
             for fact in facts}
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)

    def fits(messages: list[dict]) -> bool:
        return len(engine.encode_prompt(messages)[0]) + max_new_tokens < engine.max_seq_len

    with tempfile.TemporaryDirectory(prefix="murmur-grounded-") as folder:
        with SqliteIndex(Path(folder) / "posts.sqlite", create=True, bulk=True) as index:
            index.add(planted)
            plain = [[{"role": "user", "content": fact.question}] for fact in facts]
            grounded = [ground(messages, index, index_settings, settings, fits=fits) for messages in plain]
    on = engine.generate([g.messages for g in grounded], [_fitted(engine, g.messages, params) for g in grounded])
    off = engine.generate(plain, [_fitted(engine, messages, params) for messages in plain])
    examples = []
    for fact, g, with_posts, without in zip(facts, grounded, on, off):
        examples.append({"question": fact.question, "answer": fact.answer,
                         "retrieved_fact": where[fact.statement] in [p.id for p in g.posts],
                         "on": with_posts.text, "off": without.text,
                         "on_correct": contains(with_posts.text, fact.answer),
                         "off_correct": contains(without.text, fact.answer)})
    n = len(examples) or 1
    return {"questions": len(examples), "distractors": len(posts),
            "retrieval_found": sum(e["retrieved_fact"] for e in examples) / n,
            "share_on": sum(e["on_correct"] for e in examples) / n,
            "share_off": sum(e["off_correct"] for e in examples) / n, "examples": examples}


def _fitted(engine, messages: list[dict], params: SamplingParams) -> SamplingParams:
    """`params` with max_tokens cut to the room a small model's context leaves after the question."""
    room = engine.max_seq_len - len(engine.encode_prompt(messages)[0])
    return replace(params, max_tokens=max(1, min(params.max_tokens, room)))


def run_probe(model, tokenizer, data_dir: str | Path, seed: int = 0, max_new_tokens: int = 48) -> dict:
    """The probe for `murmur eval`: the run's held-out (test) posts as distractors, its model on the engine."""
    from murmur.infer.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=len(FACTS))
    return grounded_probe(engine, held_out_posts(data_dir, seed=seed), max_new_tokens=max_new_tokens, seed=seed)
