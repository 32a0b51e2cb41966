"""`murmur index`: build the post index from a run's posts, keep it live from a stream, or search it.

    murmur index RUN_DIR|DATA_DIR [--index postgresql://USER@HOST/DB]      build from data/posts.parquet
    murmur index RUN_DIR --follow STREAM.jsonl [--once]                    tail a stream into the index
    murmur index RUN_DIR --search "words" [-k N]                           the best posts for a query
    murmur index RUN_DIR --stats                                           what the index holds
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="index the posts for search and grounded answers; follow a live stream",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="RUN_DIR|DATA_DIR", help="a run folder, or its data folder (the index goes in "
                   "RUN_DIR/index)")
    p.add_argument("--index", metavar="URL", help="a PostgreSQL index, postgresql://USER@HOST/DB (password from "
                   "PGPASSWORD or ~/.pgpass); default SQLite in RUN_DIR/index")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--follow", metavar="STREAM", help="tail a JSONL / X API v2 stream file: new posts and "
                        "delete events are applied within a second; a restart resumes where it stopped")
    action.add_argument("--search", metavar="QUERY", help="print the posts that best match QUERY")
    action.add_argument("--stats", action="store_true", help="print what the index holds")
    p.add_argument("--once", action="store_true", help="with --follow: stop at the end of the file")
    p.add_argument("-k", type=int, default=None, help="with --search: how many posts (default index.top_k)")
    p.add_argument("--recipe", help="a recipe TOML whose [index] (and [data], for cleaning followed posts) "
                   "sections give the defaults")
    p.add_argument("--set", action="append", default=[], metavar="index.KEY=VALUE", dest="overrides",
                   help="override a setting, e.g. --set index.recency_weight=0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.config import load_settings
    from murmur.errors import MurmurError

    settings = load_settings(args.recipe, args.overrides)
    if args.index:
        settings.index.url = args.index
    if args.k is not None and not 1 <= args.k <= 1000:
        raise MurmurError("-k must be between 1 and 1000")
    if args.once and not args.follow:
        raise MurmurError("--once goes with --follow STREAM")
    location = settings.index.url or args.dir
    if args.follow:
        return _follow(args, settings, location)
    if args.search is not None:
        return _search(args, settings, location)
    if args.stats:
        return _stats(settings, location)
    return _build(args, settings)


def _build(args, settings) -> int:
    from murmur.data.compliance import data_dir_of
    from murmur.index.location import index_dir_of
    from murmur.index.stage import build

    data_dir = data_dir_of(args.dir)
    summary = build(data_dir, index_dir_of(data_dir), settings.index,
                    progress=lambda n: print(f"\r{n:,} posts", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    print(f"indexed {summary['posts']:,} posts in {summary['seconds']} s ({summary['posts_per_s'] or 0:,} posts/s)"
          f" -> {summary['location']}")
    if summary["refused_deleted"]:
        print(f"refused {summary['refused_deleted']:,} deleted posts")
    return 0


def _follow(args, settings, location) -> int:
    from murmur.index.events import EventReader
    from murmur.index.follow import follow
    from murmur.index.location import open_index

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    index = open_index(location, settings.index, create=True)
    reader = EventReader(settings.index, settings.data)
    print(f"following {args.follow} into the {index.backend} index (Ctrl-C stops; a restart resumes)",
          file=sys.stderr, flush=True)
    with index:
        counts = follow(index, args.follow, reader, poll_interval_s=settings.index.poll_interval_s,
                        batch_lines=settings.index.batch_size, max_record_bytes=settings.index.max_record_bytes,
                        stop=stop, until_idle=args.once)
    shown = {key: counts[key] for key in ("lines", "added", "replaced", "deleted", "refused_deleted", "restored",
                                           "quarantined", "restarts") if counts.get(key)}
    print("followed: " + (", ".join(f"{k} {v:,}" for k, v in shown.items()) or "nothing new"))
    for reason, n in sorted(reader.dropped.items()):
        print(f"  dropped {reason}: {n:,}")
    return 0


def _search(args, settings, location) -> int:
    from murmur.index.location import open_index
    from murmur.index.retrieve import retrieve

    with open_index(location, settings.index) as index:
        for hit in retrieve(index, args.search, settings.index, k=args.k):
            text = " ".join(hit.post.text.split())
            print(f"{hit.score:7.3f}  {hit.post.id}  {text[:100]}")
    return 0


def _stats(settings, location) -> int:
    import json

    from murmur.index.stage import describe

    print(json.dumps(describe(location, settings.index), indent=2))
    return 0
