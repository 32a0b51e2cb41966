"""The post index: curated posts in a full-text index with BM25 ranking, kept live from a stream, and the
retrieval that grounds answers in it (docs/index.md).

    index = open_index("runs/demo")                  # or a postgresql:// url
    hits = retrieve(index, "when is the Pier 7 meetup?")

Backends: SQLite FTS5 in RUN/index/ (`murmur.index.sqlite`) and PostgreSQL (`murmur.index.postgres`), one
interface (`murmur.index.base.PostIndex`) and one ranking.
"""

from murmur.index.base import Changes, Hit, IndexedPost, IndexUnavailable, PostIndex
from murmur.index.evaluate import parent_recall
from murmur.index.location import open_index
from murmur.index.retrieve import retrieve
from murmur.index.stage import audit, build, purge, run_stage
from murmur.index.text import QueryError

__all__ = ["Changes", "Hit", "IndexedPost", "IndexUnavailable", "PostIndex", "QueryError", "audit", "build",
           "open_index", "parent_recall", "purge", "retrieve", "run_stage"]
