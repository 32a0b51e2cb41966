"""`murmur eval RUN_OR_MODEL_DIR`: bits per byte, reply ranking, samples, privacy probes and the report card.

Writes RUN/eval/results.json, RUN/eval/samples.jsonl and RUN/report/ (report.md and PNG charts).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run or model: bits per byte, reply ranking, samples, "
                              "privacy probes, report card", description=__doc__)
    p.add_argument("src", metavar="RUN_OR_MODEL_DIR", help="a run folder, a checkpoint, or a Hugging Face model "
                   "directory (then pass --data)")
    p.add_argument("--compare", metavar="OTHER", help="a second run to put side by side (evaluated when it has no "
                   "eval/results.json yet)")
    p.add_argument("--checkpoints", choices=["latest", "all"], default=None,
                   help="bits per byte of the final model only, or of every saved checkpoint too")
    p.add_argument("--data", metavar="DIR", help="the data folder with held-out posts (default: RUN/data)")
    p.add_argument("--out", metavar="DIR", help="where eval/ and report/ go (default: RUN_OR_MODEL_DIR)")
    p.add_argument("--recipe", metavar="RECIPE.toml", help="take the [eval] settings from this recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set eval.ranking_examples=500 (repeatable)")
    p.add_argument("--lm-eval", metavar="TASKS", help="also run lm-eval harness tasks (comma-separated names)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a folder of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N examples per lm-eval task")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from murmur.config import load_settings
    from murmur.errors import MurmurError
    from murmur.eval.report import write_report
    from murmur.eval.runner import evaluate, read_results

    settings = load_settings(args.recipe, args.overrides)
    if args.checkpoints:
        settings.eval.checkpoints = args.checkpoints
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else None
    if args.lm_eval is not None and not tasks:
        raise MurmurError("--lm-eval needs at least one task name, e.g. --lm-eval arc_easy,hellaswag")
    out = Path(args.out) if args.out else Path(args.src)
    results = evaluate(args.src, settings.eval, data_dir=args.data, out_dir=out, lm_eval_tasks=tasks,
                       lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                       index_settings=settings.index)
    compare = []
    if args.compare:
        other = Path(args.compare)
        other_results = read_results(other)
        if other_results is None:
            other_results = evaluate(other, settings.eval, index_settings=settings.index)
            write_report(other, other_results)
        name = other_results.get("name", other.name)
        if name == results.get("name"):  # two folders of the same name: tell them apart by path
            results["name"], name = str(out), str(other)
        compare.append((name, other_results))
    page = write_report(out, results, compare)
    print(f"eval: results in {out / 'eval' / 'results.json'}, report card in {page}")
    return 0
