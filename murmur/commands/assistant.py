"""`murmur assistant`: answer @mentions from a stream file, writing reply posts to a JSONL file.

    murmur assistant RUN_OR_MODEL_DIR --follow STREAM.jsonl --out REPLIES.jsonl --handle NAME [--user-id ID]
                     [--index RUN_DIR|URL] [--once] [--recipe R.toml] [--set serve.assistant.KEY=V ...]

The stream's posts and deletions go into the post index (the run's index/, or --index), and every post that
mentions @NAME is answered as `POST /v1/mentions` answers it: grounded in the index, at most 280 characters,
with citations. Each line of REPLIES.jsonl is X's create-post body plus `annotations`:
{"text", "reply": {"in_reply_to_tweet_id"}, "annotations": [...]}. Killed and restarted, it resumes where it
stopped and never answers a mention twice (docs/assistant.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser("assistant", help="answer @mentions from a stream file into a replies file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="RUN_OR_MODEL_DIR", help="the model to answer with (a run folder, a checkpoint "
                   "or a Hugging Face model directory)")
    p.add_argument("--follow", metavar="STREAM", required=True, help="the JSONL / X API v2 stream file to follow")
    p.add_argument("--out", metavar="REPLIES.jsonl", required=True, help="where reply posts are appended")
    p.add_argument("--handle", help="the assistant's handle: posts mentioning @HANDLE are answered "
                   "(serve.assistant.handle)")
    p.add_argument("--user-id", help="the assistant's account id: its own posts are never answered "
                   "(serve.assistant.user_id)")
    p.add_argument("--index", metavar="RUN_DIR|URL", help="the post index (default RUN_OR_MODEL_DIR's index/)")
    p.add_argument("--once", action="store_true", help="stop at the end of the stream")
    p.add_argument("--recipe", help="a recipe whose [serve], [index] and [data] sections give the defaults")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override a setting, e.g. --set serve.assistant.replies_per_author=3")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from murmur.assistant.follow import MentionFollower, ReplyLedger
    from murmur.assistant.mentions import MentionDesk
    from murmur.assistant.service import Assistant
    from murmur.config import load_settings
    from murmur.errors import MurmurError
    from murmur.index.location import open_index
    from murmur.serve.launch import build_engine

    settings = load_settings(args.recipe, args.overrides)
    assistant_settings = settings.serve.assistant
    if args.handle:
        assistant_settings.handle = args.handle
    if args.user_id:
        assistant_settings.user_id = args.user_id
    if not assistant_settings.handle:
        raise MurmurError("give the assistant's handle with --handle NAME (or serve.assistant.handle): posts "
                          "mentioning @NAME are answered")
    src = Path(args.src)
    run_dir = src.parent if src.name == "model" else src
    location = args.index or settings.index.url or run_dir
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ledger = ReplyLedger(args.out)
    engine = build_engine(src, settings.serve)
    with open_index(location, settings.index, create=True) as index:
        desk = MentionDesk(Assistant(index, settings.index, assistant_settings, settings.data))
        follower = MentionFollower(desk, engine, args.follow, ledger, poll_interval_s=settings.index.poll_interval_s,
                                   batch_lines=settings.index.batch_size,
                                   max_record_bytes=settings.index.max_record_bytes,
                                   on_reply=lambda reply: print(f"replied to {reply['reply']['in_reply_to_tweet_id']}",
                                                                file=sys.stderr, flush=True))
        print(f"answering @{assistant_settings.handle} mentions in {args.follow} -> {args.out} "
              "(Ctrl-C stops; a restart resumes)", file=sys.stderr, flush=True)
        counts = follower.run(stop, until_idle=args.once)
    engine.shutdown(0.0)
    shown = {k: v for k, v in sorted(counts.items()) if v and k != "seconds"}
    print("assistant: " + (", ".join(f"{k} {v:,}" for k, v in shown.items()) or "nothing new"))
    return 0
