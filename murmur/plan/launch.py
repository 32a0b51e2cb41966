"""Launch files for a planned layout: a Murmur recipe, a multi-node torchrun script and a Slurm batch file.

The recipe sets only keys Murmur's settings define (train.parallel.pp / dp_replicate / dp_shard / tp,
pp_schedule, virtual_stages, ...), so `murmur.config.load_settings` and `murmur train RECIPE --dry-run`
accept it. The files describe the fastest layout, pipeline parallel or not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from murmur.files import write_text_atomic
from murmur.settings.model import MODEL_PRESETS

RECIPE_NAME = "recipe.toml"
TORCHRUN_NAME = "launch_torchrun.sh"
SBATCH_NAME = "launch.sbatch"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any], comment: str = "") -> str:
    """TOML text for nested tables of scalars (what a recipe holds); tables after their parent's keys."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []

    def table(prefix: str, node: dict[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and (scalars or not node):
            lines.extend(["", f"[{prefix}]"])
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for key, child in node.items():
            if isinstance(child, dict):
                table(f"{prefix}.{key}" if prefix else key, child)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def recipe_dict(plan, run_name: str = "planned") -> dict[str, Any]:
    """The recipe for the plan's fastest layout."""
    from murmur.plan.planner import pp_schedule

    cand = plan.best
    facts, lay = plan.facts, cand.layout
    model = facts.settings
    if model.preset:
        model_section: dict[str, Any] = {"preset": model.preset}
        if model.max_seq_len != MODEL_PRESETS[model.preset]["max_seq_len"]:
            model_section["max_seq_len"] = model.max_seq_len
    else:
        model_section = model.model_dump(mode="json", exclude_none=True, exclude={"preset"})
    steps = max(1, math.ceil(plan.schedule.tokens / cand.global_batch_tokens))
    step_seconds = cand.step_seconds
    interval = plan.schedule.reliability.interval_seconds
    every = steps if math.isinf(interval) else max(1, min(steps, round(interval / step_seconds)))
    return {
        "run": {"name": run_name},
        "model": model_section,
        "train": {
            "device": "cuda",
            "dtype": "bfloat16",
            "compile": True,
            "activation_checkpointing": lay.activation_checkpointing,
            "seq_len": facts.seq_len,
            "micro_batch_size": lay.micro_batch_size,
            "global_batch_tokens": cand.global_batch_tokens,
            "steps": steps,
            "warmup_steps": min(2000, max(1, steps // 20)),
            "checkpoint_interval": every,
            "async_checkpoint": True,
            "parallel": {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp,
                         "reshard_after_forward": lay.reshard_after_forward,
                         **({"pp": lay.pp, "pp_schedule": pp_schedule(lay), "virtual_stages": lay.virtual_stages}
                            if lay.pp > 1 else {})},
        },
    }


def torchrun_script(nodes: int, gpus_per_node: int, recipe: str = RECIPE_NAME) -> str:
    """A script to run on every node; torchrun's c10d rendezvous assigns the ranks."""
    return f"""#!/usr/bin/env bash
# Start the planned run: execute this same script on each of the {nodes} nodes, with MASTER_ADDR set to
# the host name of one of them (the rendezvous host). Written by `murmur plan`.
set -euo pipefail
: "${{MASTER_ADDR:?set MASTER_ADDR to the rendezvous host, e.g. the first node}}"
MASTER_PORT="${{MASTER_PORT:-29500}}"
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec torchrun \\
  --nnodes={nodes} \\
  --nproc-per-node={gpus_per_node} \\
  --rdzv-backend=c10d \\
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\
  --rdzv-id="${{RDZV_ID:-murmur}}" \\
  --max-restarts="${{MAX_RESTARTS:-0}}" \\
  -m murmur train "$HERE/{recipe}"
"""


def sbatch_script(nodes: int, gpus_per_node: int, hours: float, job_name: str, recipe: str = RECIPE_NAME) -> str:
    """A Slurm batch file: one torchrun per node, the first node as the rendezvous host."""
    total_minutes = max(10, math.ceil(hours * 60))
    days, rest = divmod(total_minutes, 24 * 60)
    limit = f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"
    return f"""#!/usr/bin/env bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
#SBATCH --time={limit}
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Written by `murmur plan`; submit from the folder that holds {recipe}: sbatch launch.sbatch
# The time limit is the planned wall-clock time; clusters cap it, and a requeued job resumes from
# the latest checkpoint.
set -euo pipefail
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
srun --kill-on-bad-exit=1 torchrun \\
  --nnodes="$SLURM_NNODES" \\
  --nproc-per-node={gpus_per_node} \\
  --rdzv-backend=c10d \\
  --rdzv-endpoint="$head_node:29500" \\
  --rdzv-id="$SLURM_JOB_ID" \\
  -m murmur train "$SLURM_SUBMIT_DIR/{recipe}"
"""




def write_launch_files(plan, out_dir: str | Path, run_name: str = "planned") -> dict[str, Path]:
    """Write the recipe and both launch scripts into `out_dir`; returns their paths by kind."""
    recipe = recipe_dict(plan, run_name)  # refuses first, before any folder is made
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cand = plan.best
    lay = cand.layout
    pipeline = f"pp {lay.pp} (virtual stages {lay.virtual_stages}) x " if lay.pp > 1 else ""
    header = (f"Written by `murmur plan` for {plan.request.gpus} x {plan.gpu.label} "
              f"({plan.request.gpus // plan.gpus_per_node} nodes of {plan.gpus_per_node}).\n"
              f"Layout: {pipeline}dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard} x tp {lay.tp}, micro-batch "
              f"{lay.micro_batch_size}, activation checkpointing {lay.activation_checkpointing}.\n"
              f"Estimate: {cand.tokens_per_second:,.0f} tokens/s, MFU {cand.mfu:.1%}, "
              f"{cand.memory.total / 2**30:.1f} GiB per GPU.")
    nodes = plan.request.gpus // plan.gpus_per_node
    goodput = plan.schedule.reliability.goodput
    hours = plan.schedule.tokens / cand.tokens_per_second / goodput / 3600 if goodput > 0 else 24 * 365
    paths = {"recipe": out / RECIPE_NAME, "torchrun": out / TORCHRUN_NAME, "sbatch": out / SBATCH_NAME}
    write_text_atomic(paths["recipe"], to_toml(recipe, header), mode=0o644)
    write_text_atomic(paths["torchrun"], torchrun_script(nodes, plan.gpus_per_node), mode=0o755)
    write_text_atomic(paths["sbatch"], sbatch_script(nodes, plan.gpus_per_node, hours, f"murmur-{run_name}"), mode=0o644)
    return paths
