"""Run under torchrun by tests/test_lora.py: LoRA finetuning with FSDP2 and the base frozen.

argv: WORK_DIR BASE_DIR. Trains WORK_DIR/fsdp (dp_shard=2, the same global batch as the single-process
reference) and WORK_DIR/fsdp-meta (the same, with the model built on the meta device and initialised after
sharding, as large models are), both from the Hugging Face folder BASE_DIR.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from train_helpers import SEQ, settings_for
from murmur.train import trainer

LORA = dict(sft_lora_rank=4, sft_lora_alpha=8.0, sft_lr=2e-2, sft_warmup_steps=1)  # tests/test_lora.py's too
DIST = dict(steps=4, eval_interval=4, checkpoint_interval=4, **LORA)  # short: the test pays for a torchrun launch


def main() -> None:
    work, base = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")  # once for both runs; run_stage joins it
    layout = dict(micro_batch_size=2, global_batch_tokens=SEQ * 8, parallel={"dp_shard": 2}, sft_init_from=base,
                  **DIST)
    trainer.run_stage(settings_for(work / "fsdp", **layout), work / "fsdp", "sft")
    dist.barrier()
    trainer.META_INIT_PARAMS = 0
    trainer.run_stage(settings_for(work / "fsdp-meta", **layout), work / "fsdp-meta", "sft")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
