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
                elif event == "delete_account":
                    counts["deleted"] += self._delete_accounts(set(items))
                    self._tombstone("account", set(items))
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
            return [Hit(post, score, score) for post, score in self._bm25(terms, limit)]

    def get(self, ids: Iterable[str]) -> dict[str, IndexedPost]:
        """The posts with these ids that are in the index."""
        with self._lock:
            return {post.id: post for post in self._where("id", ids)}

    def conversation(self, conversation_id: str, limit: int = 200) -> list[IndexedPost]:
        """The posts of a conversation, oldest first (the root, whose id is the conversation's, included)."""
        with self._lock:
            return self._conversation(conversation_id, max(0, min(int(limit), MAX_RESULTS)))

    def tombstones(self, kind: str) -> set[str]:
        with self._lock:
            return self._tombstones(_kind(kind))

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
                missing = sorted(wanted - self._tombstones(kind))
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
    def _quarantine(self, rows: list[tuple]) -> None: ...

    @abstractmethod
    def _quarantine_counts(self) -> dict[str, int]: ...

    @abstractmethod
    def _set_cursor(self, cursor: Cursor) -> None: ...

    @abstractmethod
    def _cursor(self, source: str) -> Cursor | None: ...

    @abstractmethod
    def _bm25(self, terms: list[str], limit: int) -> list[tuple[IndexedPost, float]]: ...

    @abstractmethod
    def _rows_where(self, column: str, values: list[str]) -> list[IndexedPost]: ...

    @abstractmethod
    def _conversation(self, conversation_id: str, limit: int) -> list[IndexedPost]: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...


def post_terms(post: IndexedPost) -> list[str]:
    """The words a post is indexed under (see murmur.index.text)."""
    return words(post.text)


POST_COLUMNS = ("id", "author_id", "created_at", "conversation_id", "in_reply_to_id", "text")


def post_from_row(row) -> IndexedPost:
    ident, author, created, conversation, reply, text = row[:6]
    return IndexedPost(ident, author, text, created, conversation, reply)
