"""`murmur train RECIPE.toml [--stage pretrain|sft]`: pretrain on token shards, or finetune on conversations.

Runs in one process, or under torchrun for many:

    murmur train recipe.toml
    torchrun --nproc-per-node 8 -m murmur train recipe.toml --set train.parallel.dp_shard=8
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m murmur train recipe.toml
    murmur train plans/405b/recipe.toml --dry-run --world-size 16384   # a `murmur plan --write` layout, PP included

A stage resumes from its latest checkpoint when it is run again with the same model settings.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain the model, or finetune it on conversations (sft)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="the TOML recipe")
    p.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain", help="which stage to train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and the parallel layout against the world size, print the plan, "
                        "and exit without training")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: check the layout for this many processes (default: WORLD_SIZE or 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the stage over, deleting its folder, even if it belongs to other settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from murmur.config import load_settings, run_dir
    from murmur.errors import MurmurError

    settings = load_settings(args.recipe, args.overrides)
    directory = run_dir(settings)
    if args.dry_run:
        from murmur.train.trainer import make_plan

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise MurmurError("--world-size must be at least 1")
        plan = make_plan(settings, args.stage, world)
        print(f"run folder   {directory / args.stage}")
        for line in plan.describe():
            print(line)
        tokens = directory / "tokens" / args.stage / "train"
        if not tokens.is_dir():
            print(f"note         {tokens} does not exist yet; run `murmur tokenize` before training")
        print("dry run: the recipe and layout are valid; nothing was trained")
        return 0
    if args.world_size is not None:
        raise MurmurError("--world-size only applies to --dry-run; launch processes with torchrun instead")
    from murmur.train.trainer import run_stage

    summary = run_stage(settings, directory, args.stage, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
