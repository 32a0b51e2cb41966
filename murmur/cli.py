"""The `murmur` command: one subcommand per stage, each defined in `murmur/commands/`.

Exit codes: 0 success, 1 a failure Murmur explains (one line, no traceback), 2 a usage error.
Set MURMUR_DEBUG=1 to see the traceback of an explained failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import murmur
import murmur.commands
from murmur.errors import MurmurError

# The order subcommands are listed in `murmur --help`: the order of the flow.
COMMAND_ORDER = ["data", "tokenizer", "tokenize", "train", "export", "model", "eval", "index", "serve", "chat",
                 "plan", "build", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="murmur", description="Turn a social network's own posts into a chatbot, and serve it.")
    parser.add_argument("--version", action="version", version=f"murmur {murmur.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [m.name for m in pkgutil.iter_modules(murmur.commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))
    for name in names:
        importlib.import_module(f"murmur.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except MurmurError as err:
        if os.environ.get("MURMUR_DEBUG"):
            raise
        print(f"murmur {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"murmur {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`murmur plan ... | head`): not an error. Stop writing to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
