"""Run under torchrun --nproc-per-node 4 by tests/test_train_layouts.py: every fleet layout, one launch.

argv: WORK_DIR. Each layout trains WORK_DIR/<name> (whose tokens/ the test prepared) on the same global
batch as the single-process references. Then two resumes across layouts: the PP 2 × FSDP 2 run's step-1
checkpoint continues as FSDP 4, and the HSDP run's step-1 checkpoint continues as PP 2 × TP 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from train_helpers import SEQ, recipe

from murmur.config import settings_from_dict

GLOBAL = SEQ * 8  # tokens per step in every layout: 8 sequences
STEPS = 4

# name -> (blocks of the model, [train] overrides). PP needs an untied head; PP 4 with two stages per rank
# needs 8 blocks, so it has its own 8-block reference.
LAYOUTS: dict[str, tuple[int, dict]] = {
    "hsdp": (2, {"parallel": {"dp_replicate": 2, "dp_shard": 2}}),
    "fsdp_tp": (2, {"parallel": {"dp_shard": 2, "tp": 2}}),
    "pp_fsdp": (2, {"parallel": {"pp": 2, "dp_shard": 2}}),
    "pp_tp": (2, {"parallel": {"pp": 2, "tp": 2, "dp_shard": 1}}),
    "pp_replicas": (2, {"parallel": {"pp": 2, "dp_replicate": 2, "dp_shard": 1}}),  # DDP fails here: FSDP2
    "pp4_interleaved": (8, {"parallel": {"pp": 4, "dp_shard": 1, "pp_schedule": "Interleaved1F1B",
                                         "virtual_stages": 2}}),
    "pp4_zero_bubble": (8, {"parallel": {"pp": 4, "dp_shard": 1, "pp_schedule": "InterleavedZeroBubble",
                                         "virtual_stages": 2}}),
}
# name -> (the run whose step-1 checkpoint it continues, its layout's [train] overrides)
RESUMES = {
    "pp_fsdp_to_fsdp4": ("pp_fsdp", {"parallel": {"dp_shard": 4}}),
    "hsdp_to_pp_tp": ("hsdp", LAYOUTS["pp_tp"][1]),
}


def layout_settings(run_dir: Path, layers: int = 2, **train):
    """A tiny float32 model with an untied head, 2 sequences per micro-batch, 8 per step, a checkpoint per step."""
    data = recipe(run_dir, global_batch_tokens=GLOBAL, micro_batch_size=2, steps=STEPS, checkpoint_interval=1,
                  keep_checkpoints=STEPS, eval_interval=STEPS, dtype="float32", **train)
    data["model"].update(n_layers=layers, tie_embeddings=False)
    return settings_from_dict(data)


def continue_from(src: Path, dst: Path, step: int) -> None:
    """Make `dst` a copy of the stage folder of run `src` as it was after checkpoint `step`."""
    shutil.copytree(src / "pretrain", dst / "pretrain")
    (dst / "pretrain" / "metrics.jsonl").unlink()
    checkpoints = dst / "pretrain" / "checkpoints"
    for later in checkpoints.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"step_{step:08d}\n")


def main() -> None:
    import torch.distributed as dist

    from murmur.train.trainer import run_stage

    work = Path(sys.argv[1])
    dist.init_process_group("gloo")  # once for every layout; run_stage joins it
    for name, (layers, train) in LAYOUTS.items():
        run_stage(layout_settings(work / name, layers, **train), work / name, "pretrain")
        dist.barrier()
    for name, (src, train) in RESUMES.items():
        if dist.get_rank() == 0:
            continue_from(work / src, work / name, step=1)
        dist.barrier()
        run_stage(layout_settings(work / name, **train), work / name, "pretrain")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
