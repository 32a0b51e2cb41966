"""The server backend: PostgreSQL tables with a `tsvector` column under a GIN index, ranked by BM25.

The tsvector holds exactly the words of `murmur.index.text.words` (built here, not by PostgreSQL's parser,
which would read `example.com` as one token), with their positions, so a lexeme's position count is its term
frequency. BM25 needs each term's document frequency and the average length: `terms` and `totals` keep
them, updated in the same transaction as the posts, so a search reads a few rows instead of counting. The
score is FTS5's formula with FTS5's constants; both backends rank a corpus alike.

Tables live in one schema per index (`index.pg_schema`); a rebuild fills `SCHEMA_build` and swaps it in
with one transaction, so readers see the old index or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

from murmur.index.base import (BM25_B, BM25_K1, POST_COLUMNS, Cursor, IndexedPost, IndexUnavailable, PostIndex,
                               bm25_idf, post_from_row)
from murmur.index.text import MAX_WORD_BYTES, words

SCHEMA_VERSION = "1"
SCHEMA_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,50}")  # index.pg_schema (41 at most) + "_build"; spliced into SQL
MAX_POSITION = 16383  # PostgreSQL's largest word position; later words share it
COLUMNS = ", ".join(f"p.{c}" for c in POST_COLUMNS)
TABLES = """
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.posts (
    id text PRIMARY KEY,
    author_id text NOT NULL,
    created_at double precision,
    conversation_id text,
    in_reply_to_id text,
    text text NOT NULL,
    n_terms integer NOT NULL,
    tsv tsvector NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_tsv ON {s}.posts USING gin (tsv);
CREATE INDEX IF NOT EXISTS posts_author ON {s}.posts (author_id);
CREATE INDEX IF NOT EXISTS posts_conversation ON {s}.posts (conversation_id);
CREATE INDEX IF NOT EXISTS posts_reply ON {s}.posts (in_reply_to_id);
CREATE TABLE IF NOT EXISTS {s}.terms (term text PRIMARY KEY, df bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.totals (one boolean PRIMARY KEY DEFAULT true CHECK (one),
                                       posts bigint NOT NULL, terms bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.tombstones (kind text NOT NULL, id text NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS {s}.cursors (source text PRIMARY KEY, "offset" bigint NOT NULL, head text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.quarantine (source text NOT NULL, "offset" bigint, reason text NOT NULL,
                                           record_id text);
INSERT INTO {s}.totals (posts, terms) VALUES (0, 0) ON CONFLICT DO NOTHING;
"""
# Added after schema 1 shipped: created on open, so an index built before it gains the table.
ANSWERED = """
CREATE TABLE IF NOT EXISTS {s}.answered (mention_id text PRIMARY KEY, author_id text, record text NOT NULL);
CREATE INDEX IF NOT EXISTS answered_author ON {s}.answered (author_id);
"""


def redact(url: str) -> str:
    """The url without a password, for messages and index.json."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unreadable url)"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def tsvector_literal(terms: list[str]) -> str:
    """A tsvector in PostgreSQL's text form: each word with the positions it occurs at."""
    positions: dict[str, list[int]] = {}
    for position, term in enumerate(terms, start=1):
        if len(term.encode("utf-8")) <= MAX_WORD_BYTES:
            positions.setdefault(term, []).append(min(position, MAX_POSITION))
    # Words are letters and digits only (murmur.index.text); quoting is defensive.
    return " ".join("'{}':{}".format(term.replace("\\", "\\\\").replace("'", "''"), ",".join(map(str, places)))
                    for term, places in positions.items())


class PostgresIndex(PostIndex):
    """A post index in PostgreSQL (psycopg 3). `create=True` makes the schema and tables when missing."""

    backend = "postgresql"

    def __init__(self, url: str, *, schema: str = "murmur_index", create: bool = False, **limits):
        super().__init__(**limits)
        try:
            import psycopg
        except ImportError:
            raise IndexUnavailable("a PostgreSQL index needs psycopg: pip install 'murmur[postgres]' "
                                   "(or 'psycopg[binary]')") from None
        if not SCHEMA_NAME_RE.fullmatch(schema):
            raise IndexUnavailable(f"schema name {schema[:60]!r} is not a plain lower-case name (letters, digits, "
                                   "'_', at most 51 characters)")
        self.url, self.schema = url, schema
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            raise IndexUnavailable(f"cannot connect to {redact(url)}: {str(err).strip()}") from None
        self._psycopg = psycopg
        self._check_schema(create)

    def _sql(self, text: str) -> str:
        return text.replace("{s}", f'"{self.schema}"')

    def _check_schema(self, create: bool) -> None:
        exists = self.db.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'",
                                 (self.schema,)).fetchone()
        if not exists:
            if not create:
                raise IndexUnavailable(f"no index in schema {self.schema} of {redact(self.url)}; build it with "
                                       "`murmur index RUN_DIR --index URL`")
            with self.db.transaction():
                self.db.execute(self._sql('CREATE SCHEMA IF NOT EXISTS {s}'))
                self.db.execute(self._sql(TABLES))
                self.db.execute(self._sql("INSERT INTO {s}.meta VALUES ('schema_version', %s) "
                                          "ON CONFLICT (key) DO NOTHING"), (SCHEMA_VERSION,))
        version = self.db.execute(self._sql("SELECT value FROM {s}.meta WHERE key = 'schema_version'")).fetchone()
        if not version or version[0] != SCHEMA_VERSION:
            raise IndexUnavailable(f"schema {self.schema} has index schema {version[0] if version else 'none'}, "
                                   f"this Murmur reads {SCHEMA_VERSION}; rebuild it with `murmur index`")
        if not self.db.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'answered'",
                               (self.schema,)).fetchone():
            self.db.execute(self._sql(ANSWERED))

    @contextlib.contextmanager
    def _transaction(self):
        with self.db.transaction():
            yield

    def _add(self, posts: list[IndexedPost], counts: Counter) -> None:
        ids = [p.id for p in posts]
        dead_posts = {r[0] for r in self.db.execute(
            self._sql("SELECT id FROM {s}.tombstones WHERE kind = 'post' AND id = ANY(%s)"), (ids,))}
        dead_accounts = {r[0] for r in self.db.execute(
            self._sql("SELECT id FROM {s}.tombstones WHERE kind = 'account' AND id = ANY(%s)"),
            (sorted({p.author_id for p in posts}),))}
        live = [p for p in posts if p.id not in dead_posts and p.author_id not in dead_accounts]
        counts["refused_deleted"] += len(posts) - len(live)
        if not live:
            return
        counts["replaced"] += self._remove([p.id for p in live])
        rows = []
        for p in live:
            terms = words(p.text)
            rows.append((p.id, p.author_id, p.created_at, p.conversation_id, p.in_reply_to_id, p.text, len(terms),
                         tsvector_literal(terms)))
        with self.db.cursor() as cur:
            with cur.copy(self._sql("COPY {s}.posts (id, author_id, created_at, conversation_id, in_reply_to_id, "
                                    "text, n_terms, tsv) FROM STDIN")) as copy:
                for row in rows:
                    copy.write_row(row)
        self._count_terms([p.id for p in live], +1)
        counts["added"] += len(live)

    def _count_terms(self, ids: list[str], sign: int) -> None:
        """Add (sign +1) or take away (-1) these posts' words in the document frequencies and totals."""
        self.db.execute(self._sql(
            "INSERT INTO {s}.terms (term, df) SELECT u.lexeme, %s * count(*) FROM {s}.posts p, unnest(p.tsv) u "
            "WHERE p.id = ANY(%s) GROUP BY u.lexeme ORDER BY u.lexeme "
            "ON CONFLICT (term) DO UPDATE SET df = {s}.terms.df + EXCLUDED.df"), (sign, ids))
        self.db.execute(self._sql(
            "UPDATE {s}.totals SET posts = posts + %s * c.n, terms = terms + %s * c.t FROM "
            "(SELECT count(*) AS n, coalesce(sum(n_terms), 0) AS t FROM {s}.posts WHERE id = ANY(%s)) c"),
            (sign, sign, ids))

    def _remove(self, ids: list[str]) -> int:
        """Delete these posts (when present), keeping the frequencies right; how many there were."""
        self._count_terms(ids, -1)
        self.db.execute(self._sql("DELETE FROM {s}.terms WHERE df <= 0"))
        return self.db.execute(self._sql("DELETE FROM {s}.posts WHERE id = ANY(%s)"), (ids,)).rowcount

    def _delete_posts(self, ids: set[str]) -> int:
        values = sorted(ids)
        deleted = self._remove(values)
        self.db.execute(self._sql("UPDATE {s}.posts SET in_reply_to_id = NULL WHERE in_reply_to_id = ANY(%s)"),
                        (values,))
        self.db.execute(self._sql("UPDATE {s}.posts SET conversation_id = NULL WHERE conversation_id = ANY(%s)"),
                        (values,))
        return deleted

    def _delete_accounts(self, ids: set[str]) -> int:
        posts = {r[0] for r in self.db.execute(self._sql("SELECT id FROM {s}.posts WHERE author_id = ANY(%s)"),
                                               (sorted(ids),))}
        return self._delete_posts(posts) if posts else 0

    def _tombstone(self, kind: str, ids: set[str]) -> None:
        self.db.execute(self._sql("INSERT INTO {s}.tombstones SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING"),
                        (kind, sorted(ids)))

    def _untombstone(self, kind: str, ids: set[str]) -> int:
        return self.db.execute(self._sql("DELETE FROM {s}.tombstones WHERE kind = %s AND id = ANY(%s)"),
                               (kind, sorted(ids))).rowcount

    def _tombstones(self, kind: str) -> set[str]:
        return {r[0] for r in self.db.execute(self._sql("SELECT id FROM {s}.tombstones WHERE kind = %s"), (kind,))}

    def _tombstoned(self, kind: str, ids: list[str]) -> set[str]:
        return {r[0] for r in self.db.execute(
            self._sql("SELECT id FROM {s}.tombstones WHERE kind = %s AND id = ANY(%s)"), (kind, ids))}

    def _answer_of(self, mention_id: str) -> str | None:
        row = self.db.execute(self._sql("SELECT record FROM {s}.answered WHERE mention_id = %s"),
                              (mention_id,)).fetchone()
        return row[0] if row else None

    def _record_answer(self, mention_id: str, author_id: str | None, record: str) -> bool:
        return self.db.execute(self._sql("INSERT INTO {s}.answered VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"),
                               (mention_id, author_id, record)).rowcount == 1

    def _answers(self) -> list[tuple[str, str | None, str]]:
        return self.db.execute(self._sql("SELECT mention_id, author_id, record FROM {s}.answered "
                                         "ORDER BY mention_id")).fetchall()

    def _forget_answers(self, column: str, ids: set[str]) -> None:
        assert column in ("mention_id", "author_id")
        self.db.execute(self._sql(f"DELETE FROM {{s}}.answered WHERE {column} = ANY(%s)"), (sorted(ids),))

    def _quarantine(self, rows: list[tuple]) -> None:
        with self.db.cursor() as cur:
            cur.executemany(self._sql("INSERT INTO {s}.quarantine VALUES (%s, %s, %s, %s)"), rows)

    def _quarantine_counts(self) -> dict[str, int]:
        return dict(self.db.execute(self._sql("SELECT reason, count(*) FROM {s}.quarantine GROUP BY reason "
                                              "ORDER BY reason")).fetchall())

    def _set_cursor(self, cursor: Cursor) -> None:
        self.db.execute(self._sql('INSERT INTO {s}.cursors VALUES (%s, %s, %s) ON CONFLICT (source) '
                                  'DO UPDATE SET "offset" = EXCLUDED."offset", head = EXCLUDED.head'),
                        (cursor.source, cursor.offset, cursor.head))

    def _cursor(self, source: str) -> Cursor | None:
        row = self.db.execute(self._sql('SELECT source, "offset", head FROM {s}.cursors WHERE source = %s'),
                              (source,)).fetchone()
        return Cursor(*row) if row else None

    def _term_stats(self, terms: list[str]) -> tuple[int, dict[str, int]]:
        n_posts = self.db.execute(self._sql("SELECT posts FROM {s}.totals")).fetchone()[0]
        return n_posts, dict(self.db.execute(self._sql("SELECT term, df FROM {s}.terms WHERE term = ANY(%s)"),
                                             (terms,)).fetchall())

    def _bm25(self, terms: list[str], limit: int, among: list[str], newest: int | None = None
              ) -> list[tuple[IndexedPost, float]]:
        # Read again here, after `search` chose the terms: a deletion in between (a followed stream) may have
        # taken a term's last post (its df is then 0) or every post.
        n_posts, df = self._term_stats(terms)
        n_terms = self.db.execute(self._sql("SELECT terms FROM {s}.totals")).fetchone()[0]
        if n_posts == 0:
            return []
        # The GIN index finds the posts holding a word of `among`; only those have their tsvector unnested.
        query = " | ".join("'{}'".format(t.replace("\\", "\\\\").replace("'", "''")) for t in among)
        newest_first = "ORDER BY created_at DESC NULLS LAST, id COLLATE \"C\" DESC LIMIT %(newest)s" if newest else ""
        # Each candidate's query words alone (weight A marks them, ts_filter keeps them) are unnested, in a
        # subquery per post: twice as fast as unnesting every word and grouping. The best `limit` are sorted
        # before their rows are read.
        rows = self.db.execute(self._sql(
            f"SELECT {COLUMNS}, s.score FROM ("
            "  SELECT m.id, (SELECT sum(q.idf * u.tf * (%(k1)s + 1) / (u.tf + %(k1)s * (1 - %(b)s + %(b)s * "
            "      m.n_terms / %(avgdl)s)))"
            "    FROM (SELECT lexeme, cardinality(positions) AS tf"
            "          FROM unnest(ts_filter(setweight(m.tsv, 'A', %(terms)s::text[]), '{a}'))) u"
            "    JOIN unnest(%(terms)s::text[], %(idf)s::float8[]) AS q(term, idf) ON q.term = u.lexeme) AS score"
            f"  FROM (SELECT id, tsv, n_terms FROM {{s}}.posts WHERE tsv @@ %(query)s::tsquery {newest_first}) m"
            "  ORDER BY score DESC, m.id COLLATE \"C\" LIMIT %(limit)s"
            ") s JOIN {s}.posts p ON p.id = s.id ORDER BY s.score DESC, p.id COLLATE \"C\""),
            {"k1": BM25_K1, "b": BM25_B, "avgdl": n_terms / n_posts, "query": query, "terms": terms,
             "idf": [bm25_idf(n_posts, df.get(t, 0)) for t in terms], "limit": limit, "newest": newest}).fetchall()
        return [(post_from_row(row), float(row[6])) for row in rows]

    def _rows_where(self, column: str, values: list[str]) -> list[IndexedPost]:
        assert column in POST_COLUMNS
        return [post_from_row(r) for r in self.db.execute(
            self._sql(f"SELECT {COLUMNS} FROM {{s}}.posts p WHERE p.{column} = ANY(%s)"), (values,))]

    def _conversation(self, conversation_id: str, limit: int) -> list[IndexedPost]:
        return [post_from_row(r) for r in self.db.execute(self._sql(
            f"SELECT {COLUMNS} FROM {{s}}.posts p WHERE p.conversation_id = %s OR p.id = %s "
            "ORDER BY p.created_at NULLS LAST, p.id COLLATE \"C\" LIMIT %s"), (conversation_id, conversation_id, limit))]

    def _count(self) -> int:
        return self.db.execute(self._sql("SELECT posts FROM {s}.totals")).fetchone()[0]

    def compact(self) -> None:
        """VACUUM the posts and terms: dead rows' space is marked free (PostgreSQL does not zero it; a VACUUM
        FULL rewrites the table, see docs/index.md)."""
        with self._lock:
            self.db.execute(self._sql("VACUUM {s}.posts"))
            self.db.execute(self._sql("VACUUM {s}.terms"))

    def _close(self) -> None:
        self.db.close()
