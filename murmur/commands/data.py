"""`murmur data`: curate raw posts into clean posts and conversations; `audit` and `purge` for deletions
(which reach the run's post index too, docs/index.md).

    murmur data --source FORMAT:PATH [--source ...] --out DIR [--deletions FILE] [--executor local|ray]
                [--progress | --no-progress]
    murmur data audit DIR [--deletions FILE]
    murmur data purge RUN_DIR --deletions FILE
"""

from __future__ import annotations

import argparse
import sys

FORMATS_HELP = "FORMAT is x-api, x-archive, jsonl, csv, parquet, text or chitchat ('chitchat:' = the demo corpus)"


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="curate posts: clean, scrub, filter, dedup, purge deletions, thread, split",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=[], metavar="FORMAT:PATH",
                   help=f"input files (PATH may be a glob; gzip/zstd are read as is). {FORMATS_HELP}")
    p.add_argument("--out", help="output folder (posts.parquet, conversations.parquet, quarantine.parquet, stats.json)")
    p.add_argument("--deletions", metavar="FILE",
                   help="deletion list, one event a line: post:ID or account:ID (the id is the rest of the line, "
                        "'#' included), or JSON such as {\"post\": \"ID\"}; see docs/data.md")
    p.add_argument("--executor", choices=["local", "ray"], help="where batches run (default local)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--recipe", help="a recipe TOML whose [data] section gives the defaults")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", dest="overrides",
                   help="override a setting, e.g. --set data.languages='[\"en\",\"fr\"]'")
    p.add_argument("--quiet", action="store_true", help="no progress line or funnel")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the progress line on stderr (records read, kept, quarantined, records/s, ETA); "
                        "default: shown when stderr is a terminal")
    p.set_defaults(func=run, data_action=None)
    actions = p.add_subparsers(dest="data_action", metavar="{audit,purge}")
    audit = actions.add_parser("audit", help="prove deleted posts and accounts are gone from a run's outputs, "
                                             "the quarantine and the post index included")
    audit.add_argument("dir", help="a run folder or its data folder")
    audit.add_argument("--deletions", metavar="FILE", help="deletion list to check (default: every list the run applied)")
    audit.set_defaults(func=run_audit)
    purge = actions.add_parser("purge", help="remove newly deleted posts and accounts from an existing run "
                                             "and its post index")
    purge.add_argument("dir", metavar="RUN_DIR", help="a run folder or its data folder")
    purge.add_argument("--deletions", metavar="FILE", required=True, help="the deletion list to apply")
    purge.set_defaults(func=run_purge)


def run(args: argparse.Namespace) -> int:
    from murmur.config import load_settings
    from murmur.data.pipeline import run as run_pipeline
    from murmur.errors import MurmurError

    if not args.out:
        raise MurmurError("--out DIR is required: the folder to write posts.parquet and the other outputs into")
    settings = load_settings(args.recipe, args.overrides)
    # Flags win over the recipe and --set; assignment validates like the recipe does.
    for key, value in (("executor", args.executor), ("address", args.address), ("deletions", args.deletions),
                       ("sources", args.source or None)):
        if value is not None:
            setattr(settings.data, key, value)
    stats = run_pipeline(settings.data, args.out, progress=False if args.quiet else args.progress)
    if not args.quiet:
        print_funnel(stats, args.out)
    return 0


def print_funnel(stats: dict, out) -> None:
    """The short summary a user reads after a run."""
    if stats.get("up_to_date"):
        print(f"{out}: up to date (inputs and settings unchanged)")
    print(f"records in      {stats['in']:>10,}")
    print(f"kept            {stats['kept']:>10,}   " +
          "  ".join(f"{k} {v:,}" for k, v in stats["splits"].items()))
    for reason, count in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {reason:<22}{count:>8,}")
    print(f"quarantined     {stats['quarantined']:>10,}   (see quarantine.parquet)")
    print(f"duplicates      {stats['duplicates']:>10,}")
    print(f"deleted         {stats['deleted']:>10,}")
    print(f"conversations   {stats['conversations']:>10,}   {stats['conversation_turns']:,} turns")
    if stats.get("posts_per_s"):
        print(f"{stats['elapsed_s']:.1f} s, {stats['posts_per_s']:,.0f} records/s -> {out}")


def _index_deletions(path, deletions):
    """What must be gone from the run's post index: the deletion list, and every post the data stage or a
    purge removed for a deleted account or as a copy of a deleted text (data/deleted_posts.txt)."""
    from murmur.data.compliance import Deletions, data_dir_of, deleted_post_ids

    return Deletions(posts=deletions.posts | deleted_post_ids(data_dir_of(path)), accounts=set(deletions.accounts))


def run_audit(args: argparse.Namespace) -> int:
    from murmur import index
    from murmur.data.compliance import audit, data_dir_of, load_deletions, recorded_deletions

    deletions = load_deletions(args.deletions) if args.deletions else None
    problems = audit(args.dir, deletions)
    # The index of the run (RUN/index, beside the data folder) is audited for the same deletions.
    recorded = deletions if deletions is not None else recorded_deletions(data_dir_of(args.dir))
    problems += index.audit(args.dir, _index_deletions(args.dir, recorded))
    for problem in problems[:50]:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"audit failed: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"audit passed: no deleted post, account or deleted text remains in {args.dir}")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    from murmur import index
    from murmur.data.compliance import data_dir_of, purge, recorded_deletions
    from murmur.errors import MurmurError

    summary = purge(args.dir, args.deletions)
    print(f"purged {summary['posts_removed']} posts ({summary['copies_removed']} copies of deleted texts), "
          f"cut {summary['conversations_cut']} conversations, {summary['quarantine_removed']} quarantined records "
          f"({summary['quarantine_redacted']} more kept without their raw text)")
    # Every list the run has applied (the new one is recorded by now), as the data purge honours them all:
    # an index built or followed before an older purge is brought in line too. Deleting again is a no-op.
    try:
        removed = index.purge(args.dir, _index_deletions(args.dir, recorded_deletions(data_dir_of(args.dir))))
    except MurmurError as err:
        raise MurmurError(f"the data folder was purged but its post index was not: {err}. Fix that, then run the "
                          "same purge again (it changes nothing already purged)") from None
    if removed["index"] != "none":
        print(f"index ({removed['index']}): removed {removed['index_posts_removed']} posts, each left as a "
              "tombstone so that no stream brings it back")
    if summary.get("token_problems"):
        for problem in summary["token_problems"]:
            print(f"FAIL tokens: {problem}", file=sys.stderr)
        return 1
    return 0
