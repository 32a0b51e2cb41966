"""Post index speed: build posts/s and query latency (p50, p99) for SQLite FTS5 and PostgreSQL, beside
references in the same run: a plain `LIKE` scan in SQLite, and `rank_bm25` in memory when it is installed.

    .venv/bin/python bench/index.py [--posts 100000 1000000] [--queries 200] [--pg-url URL | --no-postgres]

Synthetic posts: 5-40 words drawn from a Zipf vocabulary of 50,000 words (seeded); queries: 3-5 words drawn
from the same law, as a chat turn would be. Each query asks for the 10 best posts. The search scores only the
posts that can rank, at most 20,000 a query (docs/index.md, "Ranking"); with --check-exact, the share of
queries whose top 10 equal a full BM25 scoring of every matching post is printed for SQLite (the pruning is
the same code for both backends; a full scoring per query takes minutes on PostgreSQL). Without --pg-url, a
throwaway PostgreSQL server is started from the Debian binaries (as the `postgres` user when run as root).
The reference queries are fewer at 10^6 posts (each scans everything); their count is printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from murmur.index.base import IndexedPost  # noqa: E402
from murmur.index.sqlite import SqliteIndex  # noqa: E402
from murmur.index.text import words  # noqa: E402

VOCABULARY = 50_000
BATCH = 5000


def synthetic_posts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(VOCABULARY)]
    for start in range(0, n, BATCH):
        count = min(BATCH, n - start)
        lengths = rng.integers(5, 41, count)
        ids = np.minimum(rng.zipf(1.3, lengths.sum()) - 1, VOCABULARY - 1)
        batch, cursor = [], 0
        for i, length in enumerate(lengths):
            text = " ".join(vocab[j] for j in ids[cursor:cursor + length])
            cursor += length
            batch.append(IndexedPost(f"post{start + i}", f"user{(start + i) % 5000}", text, float(start + i)))
        yield batch


def synthetic_queries(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{min(j - 1, VOCABULARY - 1)}" for j in rng.zipf(1.3, rng.integers(3, 6))) for _ in range(n)]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]


def time_queries(search, queries: list[str]) -> tuple[float, float]:
    seconds = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds)


def exact_share(index, queries: list[str]) -> float:
    """The share of queries whose top 10 equal a full scoring of every post holding a query word."""
    from murmur.index.text import query_terms

    same = 0
    for query in queries:
        terms = query_terms(query, index.max_query_chars, index.max_query_terms)
        _, df = index._term_stats(terms)
        present = [t for t in terms if df.get(t)]
        full = [(post.id, round(score, 9)) for post, score in index._bm25(present, 10, present)] if present else []
        same += full == [(hit.post.id, round(hit.bm25, 9)) for hit in index.search(query, 10)]
    return same / len(queries)


def bench_index(make, n: int, queries: list[str], check_exact: bool = False) -> dict:
    index = make()
    start = time.perf_counter()
    for batch in synthetic_posts(n):
        index.add(batch)
    if hasattr(index, "finish_bulk"):
        index.finish_bulk()
    build = time.perf_counter() - start
    p50, p99 = time_queries(lambda q: index.search(q, 10), queries)
    exact = exact_share(index, queries) if check_exact else None
    index.close()
    return {"build_posts_per_s": n / build, "p50_ms": p50, "p99_ms": p99, "exact": exact}


def bench_like(path: Path, queries: list[str]) -> dict:
    """Every query word as `text LIKE '%word%'`, OR-ed, over every post (ranking needs every match; no ranking
    is done, so this is the least an index-less search costs)."""
    import sqlite3

    db = sqlite3.connect(path)

    def search(query: str):
        terms = words(query)
        return db.execute("SELECT count(*) FROM posts WHERE " + " OR ".join("text LIKE ?" for _ in terms),
                          [f"%{t}%" for t in terms]).fetchall()

    p50, p99 = time_queries(search, queries)
    db.close()
    return {"build_posts_per_s": None, "p50_ms": p50, "p99_ms": p99}


def bench_rank_bm25(n: int, queries: list[str]) -> dict | None:
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        return None
    start = time.perf_counter()
    corpus = [words(p.text) for batch in synthetic_posts(n) for p in batch]
    bm25 = BM25Okapi(corpus)
    build = time.perf_counter() - start
    p50, p99 = time_queries(lambda q: np.argsort(bm25.get_scores(words(q)))[-10:], queries)
    return {"build_posts_per_s": n / build, "p50_ms": p50, "p99_ms": p99}


def start_postgres(folder: str) -> tuple[str, callable]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SystemExit("no PostgreSQL binaries: pass --pg-url URL or --no-postgres")
    bin_dir = os.path.dirname(found[-1])
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if prefix:
        shutil.chown(folder, "postgres")
    data = os.path.join(folder, "data")
    quiet = dict(check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(prefix + [f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                             "--locale", "C"], **quiet)
    # Durable settings as a server would run them (fsync on); more memory for GIN builds than the default.
    subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(folder, "log"), "-o",
                             f"-k {folder} -p 5432 -c listen_addresses= -c maintenance_work_mem=256MB "
                             "-c shared_buffers=256MB", "start"], **quiet)

    def stop():
        subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "stop"], **quiet)
    return f"postgresql://postgres@/postgres?host={folder}&port=5432", stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reference-queries", type=int, default=None,
                        help="queries for the scanning references (default: all at 10^5, 20 at 10^6)")
    parser.add_argument("--pg-url", help="an existing PostgreSQL server (default: start a throwaway one)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--check-exact", action="store_true",
                        help="also score every matching post for each query (slow) and print how many top 10s match")
    args = parser.parse_args()
    queries = synthetic_queries(args.queries)
    folder = tempfile.mkdtemp(prefix="murmur-bench-index-")
    stop = None
    try:
        url = None
        if not args.no_postgres:
            url = args.pg_url
            if url is None:
                url, stop = start_postgres(folder)
        for n in args.posts:
            ref_n = args.reference_queries or (len(queries) if n <= 100_000 else 20)
            rows = {}
            path = Path(folder) / f"bench-{n}.sqlite"
            rows["sqlite fts5"] = bench_index(lambda: SqliteIndex(path, create=True, bulk=True), n, queries,
                                              args.check_exact)
            if url:
                from murmur.index.postgres import PostgresIndex

                rows["postgresql"] = bench_index(lambda: PostgresIndex(url, schema=f"bench_{n}", create=True),
                                                 n, queries)
            rows[f"sqlite LIKE scan ({ref_n} q)"] = bench_like(path, queries[:ref_n])
            reference = bench_rank_bm25(n, queries[:ref_n])
            if reference:
                rows[f"rank_bm25 in memory ({ref_n} q)"] = reference
            print(f"\n{n:,} posts, {len(queries)} queries of 3-5 words, top 10")
            print(f"{'':32} {'build posts/s':>14} {'p50 ms':>9} {'p99 ms':>9}")
            for name, row in rows.items():
                build = f"{row['build_posts_per_s']:,.0f}" if row["build_posts_per_s"] else "-"
                exact = f"   top 10 exact for {row['exact']:.0%}" if row.get("exact") is not None else ""
                print(f"{name:32} {build:>14} {row['p50_ms']:9.2f} {row['p99_ms']:9.2f}{exact}")
            for name in [r for r in rows if r not in ("sqlite fts5", "postgresql")]:
                for engine in ("sqlite fts5", "postgresql"):
                    if engine in rows:
                        print(f"  p50 {name} / {engine}: {rows[name]['p50_ms'] / rows[engine]['p50_ms']:.1f}x")
            path.unlink(missing_ok=True)
    finally:
        if stop:
            stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
