"""The index stage: build the post index from the data stage's posts.parquet; purge and audit it for deletions.

A build never changes the index readers use until it is complete: SQLite is written to a new file and
index.json is switched to it atomically; PostgreSQL is filled in a `SCHEMA_build` schema swapped in with one
transaction. Deletions survive a rebuild: the run's recorded deletion lists and the previous index's
tombstones are the new index's tombstones, so a stream replayed into it cannot bring a deleted post back.
The mentions the assistant answered are carried over too (but those deleted since), so a retried mention
is not answered a second time after a rebuild.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from murmur.errors import MurmurError
from murmur.index.base import Changes, IndexedPost, IndexUnavailable, PostIndex
from murmur.index.location import POINTER, index_dir_of, is_url, open_index, write_pointer
from murmur.settings.index import IndexSettings

READ_COLUMNS = ["id", "author_id", "text", "created_at", "conversation_id", "in_reply_to_id", "split"]


def _previous_state(index_dir: Path, url: str | None, settings: IndexSettings
                    ) -> tuple[set[str], set[str], list[tuple[str, str | None, dict]]]:
    """The tombstones (posts, accounts) and answered mentions of the index being replaced (none when there
    is none)."""
    try:
        with open_index(url or index_dir, settings) as old:
            return old.tombstones("post"), old.tombstones("account"), old.answers()
    except IndexUnavailable:
        return set(), set(), []


def _posts(data_dir: Path, splits: list[str], batch_size: int):
    """posts.parquet in batches of IndexedPost, only the wanted splits."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = data_dir / "posts.parquet"
    if not path.is_file():
        raise MurmurError(f"{path} not found; run the data stage first (`murmur data ... --out {data_dir}`)")
    wanted = set(splits)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=READ_COLUMNS):
        seconds = pc.divide(batch.column("created_at").cast("int64"), 1_000_000.0).to_pylist()
        rows = zip(batch.column("id").to_pylist(), batch.column("author_id").to_pylist(),
                   batch.column("text").to_pylist(), seconds, batch.column("conversation_id").to_pylist(),
                   batch.column("in_reply_to_id").to_pylist(), batch.column("split").to_pylist())
        yield [IndexedPost(*row[:6]) for row in rows if row[6] in wanted]


def build(data_dir: str | Path, index_dir: str | Path, settings: IndexSettings, progress=None) -> dict:
    """Index posts.parquet of `data_dir` into `index_dir` (SQLite) or `settings.url` (PostgreSQL)."""
    from murmur.data.compliance import deleted_post_ids, recorded_deletions

    data_dir, index_dir = Path(data_dir), Path(index_dir)
    started = time.monotonic()
    recorded = recorded_deletions(data_dir)
    old_posts, old_accounts, old_answers = _previous_state(index_dir, settings.url, settings)
    index, finish = _fresh_index(index_dir, settings)
    counts: Counter = Counter()
    try:
        tombstones = Changes()
        deleted_posts = recorded.posts | deleted_post_ids(data_dir) | old_posts
        deleted_accounts = recorded.accounts | old_accounts
        for ident in sorted(deleted_posts):
            tombstones.delete("post", ident)
        for ident in sorted(deleted_accounts):
            tombstones.delete("account", ident)
        index.apply(tombstones)
        for mention, author, record in old_answers:  # a retried mention stays answered once, unless deleted
            if mention not in deleted_posts and author not in deleted_accounts:
                index.record_answer(mention, author, record)
        for batch in _posts(data_dir, settings.splits, settings.batch_size):
            counts.update(index.add(batch))
            if progress:
                progress(counts["added"])
        location = finish(index)
    except BaseException:
        index.close()
        raise
    seconds = time.monotonic() - started
    return {"backend": index.backend, "location": location, "posts": counts["added"],
            "refused_deleted": counts["refused_deleted"], "seconds": round(seconds, 2),
            "posts_per_s": round(counts["added"] / seconds) if seconds else None}


def _fresh_index(index_dir: Path, settings: IndexSettings):
    """An empty index nobody reads yet, and the function that publishes it (returns where it is)."""
    limits = {"max_query_chars": settings.max_query_chars, "max_query_terms": settings.max_query_terms}
    if settings.url:
        from murmur.index.postgres import PostgresIndex, redact

        building = f"{settings.pg_schema}_build"
        _drop_schema(settings.url, building)
        index = PostgresIndex(settings.url, schema=building, create=True, **limits)

        def publish(index: PostgresIndex) -> str:
            with index.db.transaction():
                index.db.execute(f'DROP SCHEMA IF EXISTS "{settings.pg_schema}" CASCADE')
                index.db.execute(f'ALTER SCHEMA "{building}" RENAME TO "{settings.pg_schema}"')
            index.close()
            write_pointer(index_dir, {"backend": "postgresql", "url": redact(settings.url),
                                      "schema": settings.pg_schema})
            return f"{redact(settings.url)} (schema {settings.pg_schema})"
        return index, publish

    from murmur.index.sqlite import SqliteIndex

    name = f"posts-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}.sqlite"
    index = SqliteIndex(index_dir / name, create=True, bulk=True, **limits)

    def publish(index: SqliteIndex) -> str:
        index.finish_bulk()
        index.close()
        before = set(index_dir.glob("posts-*.sqlite*"))
        write_pointer(index_dir, {"backend": "sqlite", "file": name})
        # A reader that still has the old file open keeps it until it closes; new readers open the new one.
        for path in before:
            if not path.name.startswith(name):
                path.unlink(missing_ok=True)
        return str(index_dir / name)
    return index, publish


def _drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as db:
        db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run_stage(settings, run_dir: str | Path) -> dict:
    """Build RUN/index from RUN/data/posts.parquet (the `index` stage of `murmur build`); reads `[index]`."""
    run_dir = Path(run_dir)
    return build(run_dir / "data", run_dir / "index", settings.index)


def _open_for_deletions(location, settings: IndexSettings | None) -> PostIndex | None:
    """The index of a run (or at a url), or None when the run has none (nothing to purge or audit)."""
    if not is_url(location) and not (index_dir_of(location) / POINTER).is_file():
        return None
    return open_index(location, settings)


def purge(location, deletions, settings: IndexSettings | None = None) -> dict:
    """Remove deleted posts and accounts (a `murmur.data.compliance.Deletions`) from the index of a run folder
    (or at a url), leave tombstones so they never return, and make the removal physical (compact)."""
    index = _open_for_deletions(location, settings)
    if index is None:
        return {"index": "none"}
    with index:
        removed = index.delete(posts=deletions.posts, accounts=deletions.accounts)
        index.compact()
        return {"index": index.backend, "index_posts_removed": removed}


def audit(location, deletions, settings: IndexSettings | None = None) -> list[str]:
    """Problems left in the index by the deletions (empty = clean); see PostIndex.audit."""
    index = _open_for_deletions(location, settings)
    if index is None:
        return []
    with index:
        return index.audit(deletions.posts, deletions.accounts)


def describe(location, settings: IndexSettings | None = None) -> dict:
    """What an index holds: backend, posts, tombstones, quarantine counts (for `murmur index --stats`)."""
    with open_index(location, settings) as index:
        return {"backend": index.backend, "posts": len(index), "deleted_posts": len(index.tombstones("post")),
                "deleted_accounts": len(index.tombstones("account")), "quarantine": index.quarantine_counts()}

