"""`murmur tokenize --data DIR --tokenizer DIR --out DIR [--chat-jsonl FILE[:WEIGHT] ...]`: write token shards."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="write token shards: pretraining documents and chat finetuning "
                              "conversations with a loss mask", description=__doc__)
    p.add_argument("--data", required=True, help="the data folder (posts.parquet, conversations.parquet)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer folder (tokenizer.json)")
    p.add_argument("--out", required=True, help="the tokens folder to write (replaced atomically)")
    p.add_argument("--chat-jsonl", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="OpenAI `messages` JSONL to mix into chat finetuning, WEIGHT times (default 1); repeatable")
    p.add_argument("--sft-roles", choices=["both", "second"], default=None,
                   help="which speakers of a thread become the assistant (default: both)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="rewrite even when the inputs have not changed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.errors import MurmurError
    from murmur.settings.tokenizer import TokenizerSettings
    from murmur.tokenize import parse_chat_source, tokenize_corpus

    cfg = TokenizerSettings()
    if args.sft_roles:
        cfg.sft_roles = args.sft_roles
    if args.shard_tokens is not None:
        if args.shard_tokens <= 0:
            raise MurmurError("--shard-tokens must be positive")
        cfg.shard_tokens = args.shard_tokens
    sources = [parse_chat_source(s) for s in args.chat_jsonl] or None
    summary = tokenize_corpus(args.data, args.tokenizer, args.out, cfg, chat_sources=sources, force=args.force)
    if summary.get("skipped"):
        print(f"{args.out} is up to date (same inputs and settings); use --force to rewrite")
    for name, counts in summary.get("counts", {}).items():
        print(f"{name}: {counts['documents']} documents, {counts['tokens']} tokens")
    for reason, n in summary.get("unused", {}).items():
        print(f"unused: {n} ({reason})")
    print(f"wrote {args.out}")
    return 0
