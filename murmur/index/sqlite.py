"""The embedded backend: one SQLite file with an FTS5 full-text table ranked by FTS5's own bm25().

Posts live in an ordinary table; the FTS5 table indexes their text as external content, kept in step by
triggers. The file is in WAL mode, so readers (a server) never wait for the writer (a follower), and with
secure_delete a deleted post's text is overwritten on disk, not only unlinked; `purge` also merges the FTS5
segments and checkpoints the WAL so the deleted words leave the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from pathlib import Path

from murmur.index.base import POST_COLUMNS, Cursor, IndexedPost, IndexUnavailable, PostIndex, post_from_row

SCHEMA_VERSION = "1"
COLUMNS = ", ".join(f"p.{c}" for c in POST_COLUMNS)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS posts (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    author_id TEXT NOT NULL,
    created_at REAL,
    conversation_id TEXT,
    in_reply_to_id TEXT,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_author ON posts (author_id);
CREATE INDEX IF NOT EXISTS posts_conversation ON posts (conversation_id);
CREATE INDEX IF NOT EXISTS posts_reply ON posts (in_reply_to_id);
CREATE VIRTUAL TABLE IF NOT EXISTS posts_fts USING fts5(
    text, content='posts', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS posts_fts_insert AFTER INSERT ON posts BEGIN
    INSERT INTO posts_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER IF NOT EXISTS posts_fts_delete AFTER DELETE ON posts BEGIN
    INSERT INTO posts_fts (posts_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER IF NOT EXISTS posts_fts_update AFTER UPDATE OF text ON posts BEGIN
    INSERT INTO posts_fts (posts_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO posts_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TABLE IF NOT EXISTS tombstones (kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (source TEXT PRIMARY KEY, offset INTEGER NOT NULL, head TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (source TEXT NOT NULL, offset INTEGER, reason TEXT NOT NULL, record_id TEXT);
"""
# Added after schema 1 shipped: created on open, so an index built before it gains the table.
ANSWERED = """
CREATE TABLE IF NOT EXISTS answered (mention_id TEXT PRIMARY KEY, author_id TEXT, record TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answered_author ON answered (author_id);
"""
CHUNK = 500  # parameters per statement, well under SQLite's limit


class SqliteIndex(PostIndex):
    """A post index in one SQLite file. `create=True` makes the file when missing; `bulk=True` is for a fresh
    file nobody reads yet (a build): no journal, no fsync, finished by `finish_bulk()`."""

    backend = "sqlite"

    def __init__(self, path: str | Path, *, create: bool = False, bulk: bool = False, **limits):
        super().__init__(**limits)
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise IndexUnavailable(f"no index at {self.path}; build it with `murmur index RUN_DIR`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA secure_delete = ON")
            if bulk:
                self.db.execute("PRAGMA journal_mode = MEMORY")
                self.db.execute("PRAGMA synchronous = OFF")
            else:
                self.db.execute("PRAGMA journal_mode = WAL")
                # WAL + NORMAL: a committed transaction survives the process being killed (not a power cut).
                self.db.execute("PRAGMA synchronous = NORMAL")
            self._check_schema(create)
        except sqlite3.DatabaseError as err:
            raise IndexUnavailable(f"{self.path} is not a Murmur index ({err})") from None

    def _check_schema(self, create: bool) -> None:
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
        if not has_meta:
            if not create:
                raise IndexUnavailable(f"{self.path} is not a Murmur index (no meta table)")
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        version = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if not version or version[0] != SCHEMA_VERSION:
            raise IndexUnavailable(f"{self.path} has index schema {version[0] if version else 'none'}, this "
                                   f"Murmur reads {SCHEMA_VERSION}; rebuild it with `murmur index RUN_DIR`")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'answered'").fetchone():
            self.db.executescript(ANSWERED)

    def finish_bulk(self) -> None:
        """End a bulk build: merge the FTS5 segments (faster queries), switch to WAL, flush to disk."""
        with self._lock:
            self.db.execute("INSERT INTO posts_fts (posts_fts) VALUES ('optimize')")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def compact(self) -> None:
        """Make deletions physical: merge FTS5 segments (dropping deleted words), and checkpoint the WAL into
        the file, where secure_delete has zeroed the freed content."""
        with self._lock:
            self.db.execute("INSERT INTO posts_fts (posts_fts) VALUES ('optimize')")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _in(self, sql: str, values: list, *extra) -> list[tuple]:
        """Run `sql` (with one `{}` for a list of placeholders) over `values` in chunks; all rows."""
        rows = []
        for start in range(0, len(values), CHUNK):
            chunk = values[start:start + CHUNK]
            rows += self.db.execute(sql.format(", ".join("?" * len(chunk))), (*chunk, *extra)).fetchall()
        return rows

    def _add(self, posts: list[IndexedPost], counts: Counter) -> None:
        dead_posts = {r[0] for r in self._in("SELECT id FROM tombstones WHERE kind = 'post' AND id IN ({})",
                                             [p.id for p in posts])}
        dead_accounts = {r[0] for r in self._in("SELECT id FROM tombstones WHERE kind = 'account' AND id IN ({})",
                                                sorted({p.author_id for p in posts}))}
        live = [p for p in posts if p.id not in dead_posts and p.author_id not in dead_accounts]
        counts["refused_deleted"] += len(posts) - len(live)
        # rowcount counts the statement's own rows, not the FTS5 rows its trigger writes.
        counts["replaced"] += self.db.executemany("DELETE FROM posts WHERE id = ?", [(p.id,) for p in live]).rowcount
        self.db.executemany(
            "INSERT INTO posts (id, author_id, created_at, conversation_id, in_reply_to_id, text) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(p.id, p.author_id, p.created_at, p.conversation_id, p.in_reply_to_id, p.text) for p in live])
        counts["added"] += len(live)

    def _delete_posts(self, ids: set[str]) -> int:
        values = sorted(ids)
        deleted = 0
        for start in range(0, len(values), CHUNK):
            chunk = values[start:start + CHUNK]
            marks = ", ".join("?" * len(chunk))
            deleted += self.db.execute(f"DELETE FROM posts WHERE id IN ({marks})", chunk).rowcount
        for start in range(0, len(values), CHUNK):
            chunk = values[start:start + CHUNK]
            marks = ", ".join("?" * len(chunk))
            self.db.execute(f"UPDATE posts SET in_reply_to_id = NULL WHERE in_reply_to_id IN ({marks})", chunk)
            self.db.execute(f"UPDATE posts SET conversation_id = NULL WHERE conversation_id IN ({marks})", chunk)
        return deleted

    def _delete_accounts(self, ids: set[str]) -> int:
        posts = {r[0] for r in self._in("SELECT id FROM posts WHERE author_id IN ({})", sorted(ids))}
        return self._delete_posts(posts)

    def _tombstone(self, kind: str, ids: set[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?, ?)", [(kind, i) for i in sorted(ids)])

    def _untombstone(self, kind: str, ids: set[str]) -> int:
        return self.db.executemany("DELETE FROM tombstones WHERE kind = ? AND id = ?",
                                   [(kind, i) for i in sorted(ids)]).rowcount

    def _tombstones(self, kind: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM tombstones WHERE kind = ?", (kind,))}

    def _tombstoned(self, kind: str, ids: list[str]) -> set[str]:
        return {r[0] for r in self._in("SELECT id FROM tombstones WHERE id IN ({}) AND kind = ?", ids, kind)}

    def _answer_of(self, mention_id: str) -> str | None:
        row = self.db.execute("SELECT record FROM answered WHERE mention_id = ?", (mention_id,)).fetchone()
        return row[0] if row else None

    def _record_answer(self, mention_id: str, author_id: str | None, record: str) -> bool:
        return self.db.execute("INSERT OR IGNORE INTO answered VALUES (?, ?, ?)",
                               (mention_id, author_id, record)).rowcount == 1

    def _answers(self) -> list[tuple[str, str | None, str]]:
        return self.db.execute("SELECT mention_id, author_id, record FROM answered ORDER BY mention_id").fetchall()

    def _forget_answers(self, column: str, ids: set[str]) -> None:
        assert column in ("mention_id", "author_id")
        self._in(f"DELETE FROM answered WHERE {column} IN ({{}})", sorted(ids))

    def _quarantine(self, rows: list[tuple]) -> None:
        self.db.executemany("INSERT INTO quarantine VALUES (?, ?, ?, ?)", rows)

    def _quarantine_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason"))

    def _set_cursor(self, cursor: Cursor) -> None:
        self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?)", (cursor.source, cursor.offset, cursor.head))

    def _cursor(self, source: str) -> Cursor | None:
        row = self.db.execute("SELECT source, offset, head FROM cursors WHERE source = ?", (source,)).fetchone()
        return Cursor(*row) if row else None

    def _term_stats(self, terms: list[str]) -> tuple[int, dict[str, int]]:
        # fts5vocab reads the words' document counts from the FTS5 index itself, the counts bm25() uses.
        self.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.posts_vocab USING fts5vocab(main, posts_fts, 'row')")
        df = dict(self._in("SELECT term, doc FROM temp.posts_vocab WHERE term IN ({})", terms))
        return self.db.execute("SELECT count(*) FROM posts").fetchone()[0], df

    def _bm25(self, terms: list[str], limit: int, among: list[str], newest: int | None = None
              ) -> list[tuple[IndexedPost, float]]:
        # Each term a quoted string: FTS5 reads it as one literal word, never as query syntax.
        def any_of(words: list[str]) -> str:
            return " OR ".join(f'"{word}"' for word in words)

        # FTS5's bm25() scores only the words of the MATCH expression. To score every word but read only the
        # posts holding a word of `among`, match `(among) AND (every word)`: its bm25() counts the words of
        # `among` twice, so their score (bm25 of `among` alone, on the same posts) is taken away again.
        rows = "ORDER BY rowid DESC LIMIT ?" if newest else "LIMIT -1"
        if set(among) == set(terms):
            sql = (f"WITH m AS MATERIALIZED (SELECT rowid AS r, bm25(posts_fts) AS s FROM posts_fts "
                   f"WHERE posts_fts MATCH ?1 {rows.replace('?', '?3')}) "
                   f"SELECT {COLUMNS}, -m.s AS score FROM m JOIN posts p ON p.rowid = m.r "
                   "ORDER BY score DESC, p.id LIMIT ?2")
            args = (any_of(terms), limit) + ((newest,) if newest else ())
        else:
            sql = (f"WITH m AS MATERIALIZED (SELECT rowid AS r, bm25(posts_fts) AS s FROM posts_fts "
                   f"WHERE posts_fts MATCH ?1 {rows.replace('?', '?4')}), "
                   f"e AS MATERIALIZED (SELECT rowid AS r, bm25(posts_fts) AS s FROM posts_fts "
                   f"WHERE posts_fts MATCH ?2 {rows.replace('?', '?4')}) "
                   f"SELECT {COLUMNS}, e.s - m.s AS score FROM m JOIN e ON e.r = m.r JOIN posts p ON p.rowid = m.r "
                   "ORDER BY score DESC, p.id LIMIT ?3")
            args = (f"({any_of(among)}) AND ({any_of(terms)})", any_of(among), limit) + ((newest,) if newest else ())
        return [(post_from_row(row), row[6]) for row in self.db.execute(sql, args).fetchall()]

    def _rows_where(self, column: str, values: list[str]) -> list[IndexedPost]:
        assert column in POST_COLUMNS
        return [post_from_row(r) for r in self._in(f"SELECT {COLUMNS} FROM posts p WHERE p.{column} IN ({{}})",
                                                   values)]

    def _conversation(self, conversation_id: str, limit: int) -> list[IndexedPost]:
        rows = self.db.execute(
            f"SELECT {COLUMNS} FROM posts p WHERE p.conversation_id = ? OR p.id = ? "
            "ORDER BY p.created_at IS NULL, p.created_at, p.id LIMIT ?", (conversation_id, conversation_id, limit))
        return [post_from_row(r) for r in rows]

    def _count(self) -> int:
        return self.db.execute("SELECT count(*) FROM posts").fetchone()[0]

    def _close(self) -> None:
        self.db.close()
