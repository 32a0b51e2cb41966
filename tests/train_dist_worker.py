"""Run under torchrun by tests/test_train_distributed.py: several layouts in one launch.

argv: WORK_DIR. Each layout trains WORK_DIR/<name> (whose tokens/ the test prepared) with the same
global batch as the single-process reference.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from train_helpers import SEQ, settings_for
from murmur.train import trainer
from murmur.train.trainer import run_stage

GLOBAL = SEQ * 8  # tokens per step in every layout

LAYOUTS = {
    "fsdp": dict(micro_batch_size=2, parallel={"dp_shard": 2}),
    "ddp": dict(micro_batch_size=2, parallel={"dp_replicate": 2, "dp_shard": 1}),
    "tp": dict(micro_batch_size=4, parallel={"dp_shard": 1, "tp": 2}),
}


def main() -> None:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")  # once for every layout; run_stage joins it
    for name, layout in LAYOUTS.items():
        run_stage(settings_for(work / name, global_batch_tokens=GLOBAL, **layout), work / name, "pretrain")
        dist.barrier()
    # Large models are built on the meta device and initialised after sharding: force that path here.
    trainer.META_INIT_PARAMS = 0
    run_stage(settings_for(work / "fsdp-meta", global_batch_tokens=GLOBAL, **LAYOUTS["fsdp"]), work / "fsdp-meta",
              "pretrain")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
