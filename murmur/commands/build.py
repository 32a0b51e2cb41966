"""`murmur build RECIPE.toml`: run every stage of a recipe in order, skipping those already up to date."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from murmur.build import STAGE_NAMES

    p = subparsers.add_parser("build", help="run a recipe: data → tokenizer → tokenize → pretrain → sft → export "
                              "→ eval, skipping stages whose inputs have not changed", description=__doc__)
    p.add_argument("recipe", help="a TOML recipe, e.g. recipes/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.steps=200 (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, help="rerun this stage and all after it")
    group.add_argument("--only", choices=STAGE_NAMES, help="run this stage alone")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe and every stage's inputs, print the plan, do no work")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.build import execute, plan_build
    from murmur.config import load_settings

    settings = load_settings(args.recipe, args.overrides)
    plan = plan_build(settings, from_stage=args.from_stage, only=args.only)
    if args.dry_run:
        print_plan(plan)
        return 0
    execute(plan)
    return 0


def print_plan(plan) -> None:
    """The stages a build would run or skip, and why."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan for {plan.run_dir} (dry run: recipe and inputs checked, nothing done)",
                  title_justify="left")
    for column in ("stage", "action", "why"):
        table.add_column(column)
    for step in plan.steps:
        table.add_row(step.stage.name, step.action, step.reason)
    Console(highlight=False).print(table)
