"""`murmur demo`: build the shipped demo recipe (a chatbot from the chitchat corpus, on CPU), then serve it."""

from __future__ import annotations

import argparse
from pathlib import Path


def demo_recipe() -> Path:
    """recipes/demo.toml of this checkout (or of the installed package)."""
    import murmur

    package = Path(murmur.__file__).resolve().parent
    for candidate in (package.parent / "recipes" / "demo.toml", package / "recipes" / "demo.toml"):
        if candidate.is_file():
            return candidate
    from murmur.errors import MurmurError

    raise MurmurError("recipes/demo.toml not found beside the murmur package; run from a clone of the repository")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the demo chatbot on CPU and serve it on http://127.0.0.1:8000",
                              description=__doc__)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of recipes/demo.toml (repeatable)")
    p.add_argument("--host", default=None, help="address to serve on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to serve on (default: serve.port, 8000)")
    p.add_argument("--no-serve", action="store_true", help="build only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.build import build
    from murmur.cli import main as murmur_main
    from murmur.config import load_settings

    recipe = demo_recipe()
    settings = load_settings(recipe, args.overrides)
    result = build(settings)
    if args.no_serve:
        return 0
    # serve reads the recipe's [serve] section itself; --set serve.* and --host/--port win over it
    serve_args = ["serve", str(result.run_dir), "--recipe", str(recipe)]
    serve_args += [f"--set={item}" for item in args.overrides if item.strip().startswith("serve.")]
    if args.host:
        serve_args += ["--host", args.host]
    if args.port is not None:
        serve_args += ["--port", str(args.port)]
    return murmur_main(serve_args)
