"""`murmur demo`: build the demo's two recipes, write their side-by-side report card, then serve the chatbot.

1. recipes/demo-scratch.toml: a tiny model pretrained and finetuned from scratch (runs/demo-scratch), the proof
   that every stage of the pipeline runs;
2. recipes/demo.toml: SmolLM2-135M-Instruct finetuned with LoRA on the same conversations (runs/demo), the
   chatbot that is served;
3. the report card runs/demo/report/report.md: the finetuned model, the untouched base (evaluated here on the
   same data, once) and the from-scratch model side by side, with the coherence of their samples.

Every training stage has a wall-clock budget; the recipes aim the whole demo at 20 minutes on 2 CPU cores
(docs/build.md; docs/journal.md has what was measured).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# (recipe file, label on the report card), built in this order; the last one is served.
SCRATCH_RECIPE, OPEN_MODEL_RECIPE = "demo-scratch.toml", "demo.toml"
FINETUNED_LABEL, BASE_LABEL, SCRATCH_LABEL = "finetuned base", "untouched base", "from scratch"


def recipe_path(name: str) -> Path:
    """recipes/NAME of this checkout (or of the installed package)."""
    import murmur

    package = Path(murmur.__file__).resolve().parent
    for candidate in (package.parent / "recipes" / name, package / "recipes" / name):
        if candidate.is_file():
            return candidate
    from murmur.errors import MurmurError

    raise MurmurError(f"recipes/{name} not found beside the murmur package; run from a clone of the repository")


def demo_recipe() -> Path:
    """recipes/demo.toml: the open model finetuned, the run `murmur demo` serves."""
    return recipe_path(OPEN_MODEL_RECIPE)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the demo chatbot on CPU and serve it on http://127.0.0.1:8000",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of both demo recipes (repeatable)")
    p.add_argument("--host", default=None, help="address to serve on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to serve on (default: serve.port, 8000)")
    p.add_argument("--no-serve", action="store_true", help="build only")
    p.set_defaults(func=run)


def write_card(scratch_run: Path, open_settings, progress=None) -> Path:
    """The side-by-side report card of the open-model run: its finetuned model, the untouched base, the
    from-scratch run."""
    from murmur.config import run_dir
    from murmur.eval.compare import side_by_side

    return side_by_side(run_dir(open_settings), [(BASE_LABEL, open_settings.model.base), (SCRATCH_LABEL, scratch_run)],
                        open_settings.eval, label=FINETUNED_LABEL, progress=progress)


def run(args: argparse.Namespace) -> int:
    from murmur.build import build
    from murmur.cli import main as murmur_main
    from murmur.config import load_settings

    timings = {}
    results = []
    for name in (SCRATCH_RECIPE, OPEN_MODEL_RECIPE):
        mark = time.monotonic()
        settings = load_settings(recipe_path(name), args.overrides)
        results.append((settings, build(settings)))
        timings[name] = time.monotonic() - mark
    (_, scratch), (open_settings, served) = results
    mark = time.monotonic()
    page = write_card(Path(scratch.run_dir), open_settings)
    timings["report card"] = time.monotonic() - mark
    for name, (_, result) in zip((SCRATCH_RECIPE, OPEN_MODEL_RECIPE), results):
        print(f"demo: {name}: " + ", ".join(f"{s['stage']} {s['seconds']:.0f} s" for s in result.stages
                                             if s.get("seconds") is not None), flush=True)
    print("demo: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items())
          + f"; report card {page}", flush=True)
    if args.no_serve:
        return 0
    # serve reads the recipe's [serve] section itself; --set serve.* and --host/--port win over it
    serve_args = ["serve", str(served.run_dir), "--recipe", str(demo_recipe())]
    serve_args += [f"--set={item}" for item in args.overrides if item.strip().startswith("serve.")]
    if args.host:
        serve_args += ["--host", args.host]
    if args.port is not None:
        serve_args += ["--port", str(args.port)]
    return murmur_main(serve_args)
