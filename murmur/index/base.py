"""The post index's record, the changes it applies, and the interface both backends implement.

Every change goes through `PostIndex.apply(changes, cursor=...)`: one transaction holds the changes and, when
a stream is being followed, the byte offset they were read up to. A process killed at any instant therefore
leaves the index either before or after the whole batch, with an offset that matches, and a restart neither
loses nor repeats a line. Ids are unique, so even a replayed line cannot duplicate a post.

Deletions leave tombstones: a deleted post, or any post of a deleted account, is refused when it comes again
(a stream replayed after a rebuild, a late copy), until a restore event lifts the tombstone. References to a
deleted post (in_reply_to_id, conversation_id) are cleared, as `murmur data purge` clears them in posts.parquet.
"""

from __future__ import annotations

import json
import math
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from murmur.errors import MurmurError
from murmur.index.text import query_terms, words

KINDS = ("post", "account")
MAX_RESULTS = 1000  # rows one search may return, whatever the caller asks
# FTS5's BM25 constants; the PostgreSQL backend uses the same so the two rank alike.
BM25_K1 = 1.2
BM25_B = 0.75
# Posts one search scores at most. A query whose every word is common (Zipf's law makes the first few words of
# a vocabulary appear in most posts) would otherwise score most of the index; past this it ranks the newest of
# the posts holding its words instead, beside every post holding its rarer words (see PostIndex._ranked).
MAX_SCORED_POSTS = 20_000


class IndexUnavailable(MurmurError):
    """The index cannot be opened or used: missing, wrong schema, server unreachable."""


@dataclass(frozen=True, slots=True)
class IndexedPost:
    """One post as the index holds it. `created_at` is seconds since the epoch (UTC), or None when unknown."""

    id: str
    author_id: str
    text: str
    created_at: float | None = None
    conversation_id: str | None = None
    in_reply_to_id: str | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    """A post found by a search: its BM25 score (higher is better) and the score it was ranked by."""

    post: IndexedPost
    bm25: float
    score: float


@dataclass
class Changes:
    """What one transaction applies, in order: posts to add (or replace), deletions, restores, quarantined
    records. Events apply in the order they were added (a delete after an add of the same post wins)."""

    events: list[tuple[str, object]] = field(default_factory=list)

    def add(self, post: IndexedPost) -> None:
        self.events.append(("add", post))

    def delete(self, kind: str, ident: str) -> None:
        self.events.append(("delete_" + _kind(kind), ident))

    def restore(self, kind: str, ident: str) -> None:
        self.events.append(("restore_" + _kind(kind), ident))

    def quarantine(self, source: str, offset: int | None, reason: str, record_id: str | None = None) -> None:
        self.events.append(("quarantine", (source, offset, reason, record_id)))

    def __len__(self) -> int:
        return len(self.events)

    def runs(self) -> Iterator[tuple[str, list]]:
        """Consecutive events of one kind, grouped (so a backend can apply each group in one statement)."""
        kind, items = None, []
        for event, value in self.events:
            if event != kind and items:
                yield kind, items
                items = []
            kind = event
            items.append(value)
        if items:
            yield kind, items


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"deletion kind {kind!r} is neither 'post' nor 'account'")
    return kind


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a followed source has been read: a byte offset, and a digest of the bytes before it (up to
    4 KiB) that tells a file replaced or truncated since from the same file grown."""

    source: str
    offset: int
    head: str


class PostIndex(ABC):
    """A full-text index of posts with BM25 ranking. Backends: SQLite FTS5 (`murmur.index.sqlite`) and
    PostgreSQL (`murmur.index.postgres`). Safe to share between threads (one operation at a time)."""

    backend = ""

    def __init__(self, max_query_chars: int = 2000, max_query_terms: int = 32):
        self.max_query_chars = max_query_chars
        self.max_query_terms = max_query_terms
        self._lock = threading.RLock()

    # -- writing --------------------------------------------------------------------------------------------

    def apply(self, changes: Changes, cursor: Cursor | None = None) -> Counter:
        """Apply the changes (and move the cursor) in one transaction; counts of what happened: added,
        replaced, refused_deleted (a tombstoned post or account), deleted, quarantined, restored."""
        counts: Counter = Counter()
        with self._lock, self._transaction():
            for event, items in changes.runs():
                if event == "add":
                    latest = {post.id: post for post in items}  # a post given twice in a row: the last wins
                    self._add(list(latest.values()), counts)
                elif event == "delete_post":
                    counts["deleted"] += self._delete_posts(set(items))
                    self._tombstone("post", set(items))
                    self._forget_answers("mention_id", set(items))
                elif event == "delete_account":
                    counts["deleted"] += self._delete_accounts(set(items))
                    self._tombstone("account", set(items))
                    self._forget_answers("author_id", set(items))
                elif event.startswith("restore_"):
                    counts["restored"] += self._untombstone(event.removeprefix("restore_"), set(items))
                elif event == "quarantine":
                    self._quarantine(items)
                    counts["quarantined"] += len(items)
            if cursor is not None:
                self._set_cursor(cursor)
        return counts

    def add(self, posts: Iterable[IndexedPost]) -> Counter:
        changes = Changes()
        for post in posts:
            changes.add(post)
        return self.apply(changes)

    def delete(self, posts: Iterable[str] = (), accounts: Iterable[str] = ()) -> int:
        """Delete posts and every post of accounts, and remember them (tombstones); the posts removed."""
        changes = Changes()
        for ident in posts:
            changes.delete("post", ident)
        for ident in accounts:
            changes.delete("account", ident)
        return self.apply(changes)["deleted"]

    # -- reading --------------------------------------------------------------------------------------------

    def search(self, query: str, limit: int = 10) -> list[Hit]:
        """The posts that best match a query's words, best first (BM25; ties by id). A query longer than
        max_query_chars raises QueryError; words past max_query_terms are ignored."""
        terms = query_terms(query, self.max_query_chars, self.max_query_terms)
        limit = max(0, min(int(limit), MAX_RESULTS))
        if not terms or not limit:
            return []
        with self._lock:
            return [Hit(post, score, score) for post, score in self._ranked(terms, limit)]

    def _ranked(self, terms: list[str], limit: int) -> list[tuple[IndexedPost, float]]:
        """The BM25 top `limit`, scoring only as many posts as it takes to prove the order exact (MaxScore).

        A post gains less than idf x (k1 + 1) from a word, however often it holds it. Words are taken rarest
        first: the posts holding one of the first few words (the candidates) are scored with every word; a post
        holding none of them scores less than the sum of the other words' ceilings, so once the limit-th
        candidate reaches that sum, no other post can enter the list. Common words have a tiny idf (FTS5
        floors it at 1e-6 past half the posts), so the proof usually holds with the rarest word alone, and the
        posts holding the common words are never read. Ties break by id, as in a full scoring.

        When the candidates would pass MAX_SCORED_POSTS, the newest MAX_SCORED_POSTS of them are scored,
        merged with the exact ranking of the largest prefix of rare words that fitted: the work per query is
        bounded, and only a query made of words in more posts than that is ranked approximately."""
        n_posts, df = self._term_stats(terms)
        present = sorted((t for t in terms if df.get(t)), key=lambda t: (df[t], t))
        ceilings = [bm25_idf(n_posts, df[t]) * (BM25_K1 + 1) for t in present]
        found: list[tuple[IndexedPost, float]] = []
        for size in range(1, len(present) + 1):
            essential, last = present[:size], size == len(present)
            work = sum(df[t] for t in essential)  # at least the posts holding any of them
            if work > MAX_SCORED_POSTS:
                newest = self._bm25(present, limit, essential, newest=MAX_SCORED_POSTS)
                merged = {post.id: (post, score) for post, score in found + newest}
                return sorted(merged.values(), key=lambda hit: (-hit[1], hit[0].id))[:limit]
            if not last and work < limit and work + df[present[size]] <= MAX_SCORED_POSTS:
                continue  # too few to fill the list: the candidates can prove nothing yet
            found = self._bm25(present, limit, essential)
            if last or (len(found) == limit and found[-1][1] >= sum(ceilings[size:])):
                return found
        return found

    def get(self, ids: Iterable[str]) -> dict[str, IndexedPost]:
        """The posts with these ids that are in the index."""
        with self._lock:
            return {post.id: post for post in self._where("id", ids)}

    def conversation(self, conversation_id: str, limit: int = 200) -> list[IndexedPost]:
        """The posts of a conversation, oldest first (the root, whose id is the conversation's, included)."""
        with self._lock:
            return self._conversation(conversation_id, max(0, min(int(limit), MAX_RESULTS)))

    def tombstones(self, kind: str) -> set[str]:
        """Every tombstone of a kind: for audits and summaries, never per request (see `tombstoned`)."""
        with self._lock:
            return self._tombstones(_kind(kind))

    def tombstoned(self, kind: str, ids: Iterable[str]) -> set[str]:
        """Which of `ids` are tombstoned: a lookup of those ids alone, whatever the number of deletions."""
        wanted = sorted(set(ids))
        with self._lock:
            return self._tombstoned(_kind(kind), wanted) if wanted else set()

    # -- answered mentions: what the assistant replied, so a mention delivered twice is answered once -------

    def answer_of(self, mention_id: str) -> dict | None:
        """The record kept when the mention was answered (`record_answer`), or None."""
        with self._lock:
            stored = self._answer_of(mention_id)
        return json.loads(stored) if stored is not None else None

    def record_answer(self, mention_id: str, author_id: str | None, record: dict) -> bool:
        """Remember that a mention was answered, and how; False when it already was (the first record stays).
        Deleting the mention or its author's account forgets it, as it forgets the posts."""
        with self._lock, self._transaction():
            return self._record_answer(mention_id, author_id, json.dumps(record, ensure_ascii=False))

    def answers(self) -> list[tuple[str, str | None, dict]]:
        """Every answered mention (mention id, author, record), in mention id order: what a rebuilt index
        carries over, so that a retry after `murmur index` is still answered once."""
        with self._lock:
            return [(mention, author, json.loads(record)) for mention, author, record in self._answers()]

    def audit(self, posts: Iterable[str], accounts: Iterable[str]) -> list[str]:
        """Problems: a deleted post or a post of a deleted account still present, a reference to a deleted
        post left, or a deletion without its tombstone (a replayed stream could bring the post back)."""
        posts, accounts = set(posts), set(accounts)
        problems = []
        with self._lock:
            present = self._where("id", posts) + self._where("author_id", accounts)
            for post in sorted(present, key=lambda p: p.id):
                why = f"of deleted account {post.author_id}" if post.author_id in accounts else "deleted"
                problems.append(f"index: post {post.id} is {why} but still indexed")
            for column in ("in_reply_to_id", "conversation_id"):
                for post in self._where(column, posts):
                    problems.append(f"index: post {post.id} still names deleted post {getattr(post, column)} "
                                    f"in {column}")
            for kind, wanted in (("post", posts), ("account", accounts)):
                missing = sorted(wanted - self._tombstoned(kind, sorted(wanted)))
                if missing:
                    problems.append(f"index: {len(missing)} deleted {kind}(s) have no tombstone (e.g. "
                                    f"{missing[0]}); a replayed stream could index them again; "
                                    "`murmur data purge` adds them")
        return problems

    def cursor(self, source: str) -> Cursor | None:
        with self._lock:
            return self._cursor(source)

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def quarantine_counts(self) -> dict[str, int]:
        with self._lock:
            return self._quarantine_counts()

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> PostIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self, column: str, values: Iterable[str]) -> list[IndexedPost]:
        """The posts whose `column` is one of `values`, asked in chunks (a statement's parameters are few)."""
        wanted = sorted(set(values))
        found: list[IndexedPost] = []
        for start in range(0, len(wanted), 500):
            found += self._rows_where(column, wanted[start:start + 500])
        return found

    # -- what a backend implements (called with the lock held; writes inside _transaction) -------------------

    @abstractmethod
    def _transaction(self): ...

    @abstractmethod
    def _add(self, posts: list[IndexedPost], counts: Counter) -> None:
        """Insert posts (unique ids), replacing those already present, refusing tombstoned ones."""

    @abstractmethod
    def _delete_posts(self, ids: set[str]) -> int: ...

    @abstractmethod
    def _delete_accounts(self, ids: set[str]) -> int: ...

    @abstractmethod
    def _tombstone(self, kind: str, ids: set[str]) -> None: ...

    @abstractmethod
    def _untombstone(self, kind: str, ids: set[str]) -> int: ...

    @abstractmethod
    def _tombstones(self, kind: str) -> set[str]: ...

    @abstractmethod
    def _tombstoned(self, kind: str, ids: list[str]) -> set[str]:
        """Which of `ids` (sorted, distinct) are tombstoned, read by primary key."""

    @abstractmethod
    def _answer_of(self, mention_id: str) -> str | None: ...

    @abstractmethod
    def _record_answer(self, mention_id: str, author_id: str | None, record: str) -> bool: ...

    @abstractmethod
    def _answers(self) -> list[tuple[str, str | None, str]]: ...

    @abstractmethod
    def _forget_answers(self, column: str, ids: set[str]) -> None:
        """Forget the answers to these mentions (`column` "mention_id") or authors ("author_id")."""

    @abstractmethod
    def _quarantine(self, rows: list[tuple]) -> None: ...

    @abstractmethod
    def _quarantine_counts(self) -> dict[str, int]: ...

    @abstractmethod
    def _set_cursor(self, cursor: Cursor) -> None: ...

    @abstractmethod
    def _cursor(self, source: str) -> Cursor | None: ...

    @abstractmethod
    def _term_stats(self, terms: list[str]) -> tuple[int, dict[str, int]]:
        """The posts indexed, and each word's document frequency (words in no post may be left out)."""

    @abstractmethod
    def _bm25(self, terms: list[str], limit: int, among: list[str], newest: int | None = None
              ) -> list[tuple[IndexedPost, float]]:
        """The `limit` best posts by BM25 over all `terms`, among the posts holding a word of `among` (only the
        `newest` of those when given), best first, ties by id."""

    @abstractmethod
    def _rows_where(self, column: str, values: list[str]) -> list[IndexedPost]: ...

    @abstractmethod
    def _conversation(self, conversation_id: str, limit: int) -> list[IndexedPost]: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...


def bm25_idf(n_posts: int, df: int) -> float:
    """FTS5's inverse document frequency: never zero or negative, so a very common word still counts a little."""
    value = math.log((n_posts - df + 0.5) / (df + 0.5))
    return value if value > 0 else 1e-6


def post_terms(post: IndexedPost) -> list[str]:
    """The words a post is indexed under (see murmur.index.text)."""
    return words(post.text)


POST_COLUMNS = ("id", "author_id", "created_at", "conversation_id", "in_reply_to_id", "text")


def post_from_row(row) -> IndexedPost:
    ident, author, created, conversation, reply, text = row[:6]
    return IndexedPost(ident, author, text, created, conversation, reply)
