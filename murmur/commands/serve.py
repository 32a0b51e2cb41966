"""`murmur serve RUN_OR_MODEL_DIR`: an OpenAI-compatible API and a web chat page for a model.

Serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and the chat page at /.
API keys come from --api-key (repeatable) and MURMUR_API_KEYS (comma-separated); with none, anyone
may call. Requests must name this server in their Host header: localhost, an address, the --host name,
or one of --allowed-hosts (e.g. the name a reverse proxy forwards). Web pages of other origins may call
the API only when --allowed-origins lists them. Any serve setting can be given as --set serve.KEY=VALUE
(e.g. serve.max_batch_size=32, serve.max_connections=1000); docs/serve.md lists them and their limits.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible API and a web chat page",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="RUN_OR_MODEL_DIR", help="a Murmur run folder or checkpoint, or a Hugging Face "
                   "model directory with its tokenizer")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--api-key", action="append", metavar="KEY", help="accept this Bearer key (repeatable)")
    p.add_argument("--model-name", help="the name clients pass as `model` (default: the run's name)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--max-batch-size", type=int, help="requests decoded together (default 16)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile the decode step (faster decoding after a warm-up at start-up)")
    p.add_argument("--quantize", choices=["none", "int8"], help="int8: serve with int8 weights (weight-only, a "
                   "scale per output channel; faster on CPU, small quality cost: docs/serve.md)")
    p.add_argument("--rate-limit", type=int, metavar="PER_MINUTE", help="requests per minute per key (0 = off)")
    p.add_argument("--allowed-hosts", action="append", metavar="NAME[,NAME]", help="Host names to answer to "
                   "besides localhost, addresses and --host ('*' = any; repeatable)")
    p.add_argument("--allowed-origins", action="append", metavar="ORIGIN[,ORIGIN]", help="web origins allowed "
                   "to call the API from a browser, e.g. https://app.example.com (CORS; repeatable)")
    p.add_argument("--trusted-proxy", action="append", metavar="ADDRESS", help="a reverse proxy whose "
                   "X-Forwarded-For gives the client address (repeatable)")
    index = p.add_mutually_exclusive_group()
    index.add_argument("--index", metavar="RUN_DIR|URL", help="ground chat in this post index and answer "
                       "mentions (a run or index folder, or postgresql://...); default the run's own index/")
    index.add_argument("--no-index", action="store_true", help="serve without a post index, even when the run "
                       "has one")
    p.add_argument("--recipe", help="read the [serve] (and [index], [data]) sections of this recipe first")
    p.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE", help="any serve setting "
                   "(index.KEY=VALUE for retrieval's ranking, e.g. index.top_k=4)")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from the recipe, --set overrides, then the explicit flags."""
    return all_settings_from_args(args).serve


def all_settings_from_args(args: argparse.Namespace):
    """The recipe's settings with --set overrides, serve's explicit flags applied."""
    from murmur.config import apply_overrides, read_recipe, settings_from_dict
    from murmur.errors import SettingsError
    from murmur.serve.launch import api_keys

    data = read_recipe(args.recipe) if args.recipe else {}
    for item in args.set:
        if not item.startswith(("serve.", "index.")):
            raise SettingsError(f"--set {item!r}: only serve.* and index.* settings apply to `murmur serve`")
    data = apply_overrides(data, args.set)
    flags = {"host": args.host, "port": args.port, "model_name": args.model_name, "device": args.device,
             "max_batch_size": args.max_batch_size, "rate_limit_per_minute": args.rate_limit, "compile": args.compile,
             "quantize": args.quantize,
             "allowed_hosts": comma_list(args.allowed_hosts), "allowed_origins": comma_list(args.allowed_origins),
             "trusted_proxies": comma_list(args.trusted_proxy)}
    serve = data.setdefault("serve", {})
    serve.update({k: v for k, v in flags.items() if v is not None})
    settings = settings_from_dict(data, origin="serve settings")
    settings.serve.api_keys = api_keys(args.api_key, settings.serve)
    return settings


def comma_list(values: list[str] | None) -> list[str] | None:
    """The items of repeated, comma-separated flag values; None when the flag was not given."""
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    from murmur.serve.launch import serve

    settings = all_settings_from_args(args)
    index = None if args.no_index else args.index or settings.index.url
    serve(args.src, settings.serve, index=index, use_index=not args.no_index, index_settings=settings.index,
          data_settings=settings.data)
    return 0
