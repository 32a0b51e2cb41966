"""`murmur plan`: what a fleet of GPUs can train, with which parallel layout, how long it takes and what it costs.

    murmur plan --gpu h100 --gpus 1024 --preset 70b                   # compute-optimal tokens, best layout
    murmur plan --gpu h100 --gpus 10000 --days 30                     # the largest model 30 days allow
    murmur plan --gpu h200 --gpus 64 --params 8B --tokens 2T --write plans/8b   # + recipe and launch scripts

Numbers take suffixes: K, M, B (or G), T, P (8B, 15.6T, 3.8e25).
"""

from __future__ import annotations

import argparse
import math

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def _number(text: str) -> float:
    raw = text.strip().replace(",", "").replace("_", "")
    scale = 1.0
    if raw and raw[-1].lower() in _SUFFIXES:
        scale, raw = _SUFFIXES[raw[-1].lower()], raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 8B, 15.6T, 3.8e25)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(text: str) -> float:
    """A number above zero."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than zero")
    return value


def positive_int(text: str) -> int:
    """A whole number above zero."""
    value = positive(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(value)


def non_negative(text: str) -> float:
    """A number of zero or more."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1 (e.g. 0.4)")
    return value


def register(subparsers) -> None:
    from murmur.settings.model import MODEL_PRESETS

    p = subparsers.add_parser("plan", help="fleet planner: what N GPUs can train, which layout, how long",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", required=True, help="GPU type: a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, b200")
    p.add_argument("--gpus", required=True, type=positive_int, help="total number of GPUs")
    p.add_argument("--gpus-per-node", type=positive_int, default=None, help="GPUs per node (default 8)")
    model = p.add_argument_group("model (one of, or none with --days/--budget-flops to size the largest one)")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--params", type=positive, help="parameter count; a Llama-3-style shape is chosen")
    which.add_argument("--preset", choices=list(MODEL_PRESETS), help="a Murmur model preset")
    for flag, help_text in (("--dim", "model width"), ("--n-layers", "blocks"), ("--n-heads", "attention heads"),
                            ("--n-kv-heads", "key-value heads"), ("--ffn-dim", "SwiGLU width"),
                            ("--vocab-size", "vocabulary size")):
        model.add_argument(flag, type=positive_int, help=f"{help_text} (shape flag; overrides the preset)")
    goal = p.add_argument_group("goal (at most one; default: Chinchilla's 20 tokens per parameter)")
    goals = goal.add_mutually_exclusive_group()
    goals.add_argument("--tokens", type=positive, help="tokens to train on")
    goals.add_argument("--budget-flops", type=positive, help="a compute budget in FLOPs")
    goals.add_argument("--days", type=positive, help="wall-clock days available")
    p.add_argument("--seq-len", type=positive_int, help="training sequence length (default: min(model, 8192))")
    p.add_argument("--global-batch-tokens", type=positive_int,
                   help="tokens per optimizer step (default: DeepSeek LLM's optimum for the compute, rounded "
                        "to what each layout allows)")
    p.add_argument("--price-per-gpu-hour", type=positive, help="price of one GPU-hour, for the cost")
    eff = p.add_mutually_exclusive_group()
    eff.add_argument("--mfu", type=fraction, default=None,
                     help="MFU a layout reaches when nothing stalls it (default 0.5); communication, "
                          "recomputation and the pipeline bubble are taken off it")
    eff.add_argument("--calibrate-from", metavar="METRICS_JSONL",
                     help="take that MFU from a Murmur run's metrics.jsonl (median, warm-up left out)")
    p.add_argument("--failure-rate", type=non_negative, default=None,
                   help="interruptions per GPU-hour (default: Llama 3's 466 in 54 days on 16,384 GPUs = 2.2e-5; "
                        "0 plans without failures)")
    p.add_argument("--checkpoint-seconds", type=positive, default=None, help="time to write a checkpoint (default 60)")
    p.add_argument("--restart-seconds", type=non_negative, default=None,
                   help="time from a failure to training again (default 600)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="optimizer (its state size)")
    p.add_argument("--top", type=positive_int, default=8, help="layouts to list (default 8)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write", metavar="DIR", help="write recipe.toml, launch_torchrun.sh and launch.sbatch there")
    p.add_argument("--run-name", default="planned", help="run.name in the written recipe")
    p.set_defaults(func=run)


def _model_settings(args: argparse.Namespace):
    from murmur.config import settings_from_dict

    shape = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
             if getattr(args, k) is not None}
    if args.preset is None and not shape:
        return None
    if args.params is not None and shape:
        from murmur.errors import MurmurError

        raise MurmurError("give either --params or the shape flags (--dim, --n-layers, ...), not both")
    data = {"preset": args.preset, **shape} if args.preset else shape
    if args.preset is None:
        data.setdefault("max_seq_len", args.seq_len or 8192)
    return settings_from_dict({"model": data}, origin="model shape").model


def build_request(args: argparse.Namespace):
    """The PlanRequest the flags describe."""
    from murmur.plan import schedule as sched
    from murmur.plan.planner import DEFAULT_EFFICIENCY, PlanRequest, calibrated_efficiency

    efficiency = args.mfu or (calibrated_efficiency(args.calibrate_from) if args.calibrate_from
                              else DEFAULT_EFFICIENCY)
    return PlanRequest(
        gpu=args.gpu, gpus=args.gpus, model=_model_settings(args), params=args.params, tokens=args.tokens,
        budget_flops=args.budget_flops, days=args.days, gpus_per_node=args.gpus_per_node, seq_len=args.seq_len,
        global_batch_tokens=args.global_batch_tokens, price_per_gpu_hour=args.price_per_gpu_hour,
        efficiency=efficiency,
        failures_per_gpu_hour=sched.LLAMA3_FAILURES_PER_GPU_HOUR if args.failure_rate is None else args.failure_rate,
        checkpoint_seconds=args.checkpoint_seconds or sched.DEFAULT_CHECKPOINT_SECONDS,
        restart_seconds=sched.DEFAULT_RESTART_SECONDS if args.restart_seconds is None else args.restart_seconds,
        optimizer=args.optimizer)


def run(args: argparse.Namespace) -> int:
    import json

    from murmur.plan.launch import write_launch_files
    from murmur.plan.planner import make_plan
    from murmur.plan.report import render

    plan = make_plan(build_request(args))
    written = write_launch_files(plan, args.write, args.run_name) if args.write else {}
    if args.json:
        data = plan.as_dict(top=args.top)
        data["written"] = {k: str(v) for k, v in written.items()}
        print(json.dumps(data, indent=2))
    else:
        print(render(plan, top=args.top))
        for kind, path in written.items():
            print(f"wrote {kind:9s} {path}")
    return 0
