"""Settings of the training stage (`murmur train`): batch, schedule, optimizer, parallel layout, checkpoints.

The parallel degrees follow torchtitan's names: pp × dp_replicate × dp_shard × tp = world size.
dp_shard = -1 means "whatever is left" once the others are fixed.
"""

from typing import Literal, get_args

from pydantic import Field

from murmur.errors import MurmurError
from murmur.settings.base import Section

# The projections of a block that LoRA can adapt (sft.lora_targets): attention, then MLP.
LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: tuple[str, ...] = get_args(LoraTarget)

# Each training stage and the recipe section that configures it.
STAGE_SECTIONS = {"pretrain": "train", "sft": "sft"}


class ParallelSettings(Section):
    """How the model is spread over processes. DDP is dp_replicate=N; FSDP2 is dp_shard=N; HSDP is both;
    tp and pp split each model copy by width and by depth."""

    dp_replicate: int = Field(1, ge=1, description="replicas (DDP, or the replicate dim of HSDP across nodes)")
    dp_shard: int = Field(-1, ge=-1, description="FSDP2 sharding degree; -1 = world / (dp_replicate * tp)")
    tp: int = Field(1, ge=1, description="tensor parallel degree (within a node)")
    pp: int = Field(1, ge=1, description="pipeline parallel degree: the blocks split into pp stages (across nodes)")
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "InterleavedZeroBubble"] = Field(
        "1F1B", description="pipeline schedule (torch.distributed.pipelining); the interleaved ones run "
        "virtual_stages stages per pipeline rank; InterleavedZeroBubble only without data parallelism")
    virtual_stages: int = Field(1, ge=1, description="pipeline stages per pp rank: 1 for 1F1B, any for the "
                                "interleaved schedules")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered params after forward (ZeRO-3)")


class TrainSettings(Section):
    """Optimisation of one training stage. The same fields serve pretraining and SFT."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, float32 on CPU")
    compile: bool = False
    activation_checkpointing: Literal["none", "full"] = "none"
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)

    seq_len: int = Field(256, gt=0)
    micro_batch_size: int = Field(16, gt=0, description="sequences per process per forward")
    global_batch_tokens: int = Field(0, ge=0, description="tokens per optimizer step; 0 = one micro-batch per rank")
    steps: int = Field(1000, gt=0, description="optimizer steps; with time_budget_minutes, the most steps")
    time_budget_minutes: float = Field(
        0, ge=0, description="wall-clock budget of the stage, 0 = none: the trainer times its first steps, fixes "
        "the number of steps that fit (at most `steps`; schedule computed for it) and records it in "
        "STAGE/budget.json; --set SECTION.steps=N SECTION.time_budget_minutes=0 reproduces the run")

    optimizer: Literal["adamw", "muon"] = Field("adamw", description="muon: Muon for hidden matrices, AdamW "
                                                "for embeddings, head, norms and biases")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (peak, after warmup)")
    muon_lr: float = Field(0.02, gt=0, description="Muon learning rate for hidden matrices (optimizer=muon)")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 0

    log_interval: int = Field(10, gt=0)
    loggers: list[Literal["tensorboard", "trackio", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers the records also go to "
        "(metrics.jsonl always): tensorboard (tb/), trackio (local, $TRACKIO_DIR), wandb (WANDB_MODE=offline "
        "keeps it local); each is an extra: pip install 'murmur[trackio]'")
    eval_interval: int = Field(200, gt=0)
    eval_batches: int = Field(20, gt=0)
    checkpoint_interval: int = Field(500, gt=0)
    keep_checkpoints: int = Field(3, ge=1)
    async_checkpoint: bool = False
    nan_policy: Literal["stop", "skip"] = "stop"


class SFTSettings(TrainSettings):
    """Chat finetuning: the same knobs as pretraining, with defaults for a short, gentle second stage."""

    lr: float = Field(1e-3, gt=0)
    steps: int = Field(300, gt=0)
    warmup_steps: int = Field(20, ge=0)
    init_from: str | None = Field(None, description="checkpoint or Hugging Face directory to start from; "
                                  "default: the run's latest pretraining checkpoint")
    # LoRA (murmur/train/lora.py): low-rank adapters on the chosen projections, the base frozen.
    lora_rank: int = Field(0, ge=0, description="rank of the LoRA adapters; 0 = full finetuning (no adapters)")
    lora_alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by lora_alpha / lora_rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input while training")
    lora_targets: list[LoraTarget] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1,
                                           description="the projections of every block that get adapters")


def section_name(stage: str) -> str:
    """The recipe section of a training stage (`train` for pretraining, `sft` for finetuning), for messages."""
    if stage not in STAGE_SECTIONS:
        raise MurmurError(f"unknown training stage {stage!r}; use one of: {', '.join(STAGE_SECTIONS)}")
    return STAGE_SECTIONS[stage]


def training_settings(settings, stage: str) -> TrainSettings:
    """The section of the whole `Settings` that a training stage reads: `settings.train` or `settings.sft`."""
    return getattr(settings, section_name(stage))
