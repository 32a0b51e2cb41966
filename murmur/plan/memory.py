"""Per-GPU memory of one training layout: model states, activations, logits and working buffers.

The accounting follows what Murmur's trainer does with FSDP2 mixed precision (the torchtitan recipe):

- model states: fp32 master parameters (4 B), fp32 gradients (4 B) and AdamW's two fp32 moments (8 B),
  16 bytes per parameter, sharded over dp_shard x tp within a pipeline stage (HSDP's replicas each hold a
  full shard set, so dp_replicate does not divide);
- working buffers (FSDP only, dp_shard > 1): FSDP gathers one unit (a block, or the embedding / output
  head) in bf16 while it prefetches the next, and holds the unsharded fp32 gradient of one unit before its
  reduce-scatter; without resharding after forward, the whole stage's gathered bf16 parameters stay until
  backward;
- activations, in bf16, per token and per block, as a compiled block saves them for backward
  (see `activation_elements_per_token`); tensor parallelism with sequence parallelism divides them by tp;
  full activation checkpointing keeps only each block's input plus one block being recomputed;
  a 1F1B pipeline keeps up to pp micro-batches in flight on its first stage;
- the loss: bf16 logits, their fp32 copy and the fp32 gradient (10 bytes per vocabulary entry per token),
  vocabulary-parallel under tp;
- the caching allocator's fragmentation (10% on top of what is allocated) and the CUDA context and
  NCCL buffers (1.5 GiB), which live outside PyTorch's allocator.

`compute_bytes=4, compiled=False` describes a float32 eager run, as on CPU, where
tests/test_plan_memory_measured.py checks `MemoryEstimate.allocated` against the trainer's measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from murmur.settings.model import ModelSettings

GiB = 2**30
STATE_BYTES_PER_PARAM = {"adamw": 16, "muon": 12}  # fp32 param + fp32 grad + optimizer moments
FRAGMENTATION = 0.10
RUNTIME_RESERVE_BYTES = 1.5 * GiB


@dataclass(frozen=True)
class Layout:
    """How a run is spread: world = dp_replicate x dp_shard x tp x pp."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch_size: int
    activation_checkpointing: str  # "none" | "full", as train.activation_checkpointing
    virtual_stages: int = 1  # interleaved pipeline: model chunks per pipeline rank
    reshard_after_forward: bool = True  # train.parallel.reshard_after_forward: False keeps gathered params

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp


class ModelFacts:
    """The sizes of a model the planner needs, computed once from its settings through murmur.model."""

    def __init__(self, settings: ModelSettings, seq_len: int):
        from murmur.model import count_params, flops_per_token

        self.settings = settings
        self.seq_len = seq_len
        s = settings
        self.params = count_params(s)
        self.embedding_params = s.vocab_size * s.dim
        # count_params without embeddings = n_layers * block + final norm (+ the untied head)
        blocks = count_params(s, embeddings=False) - s.dim - (0 if s.tie_embeddings else self.embedding_params)
        self.layer_params = blocks / s.n_layers
        self.flops_per_token = flops_per_token(s, seq_len=seq_len)
        self.non_embedding_params = count_params(s, embeddings=False)

    def activation_elements_per_token(self, compiled: bool = True) -> float:
        """Values one block saves for backward per token (no recomputation).

        Per token: both norms' input and output (4 dim); q, k, v after rotary embedding, the attention
        output and its contiguous copy for o_proj (3 q + 2 kv); gate and up projections and their
        product (3 ffn). A compiled block recomputes the SiLU; eager mode also saves it (one more ffn).
        """
        s = self.settings
        q = s.n_heads * s.attention_head_dim
        kv = s.kv_heads * s.attention_head_dim
        return 4 * s.dim + 3 * q + 2 * kv + (3 if compiled else 4) * s.hidden_dim

    @lru_cache(maxsize=None)
    def stage_blocks(self, pp: int) -> tuple[int, ...]:
        """Blocks on each pipeline stage, as the trainer cuts them (murmur.train.pipeline.split_layers)."""
        from murmur.train.pipeline import split_layers

        return tuple(len(r) for r in split_layers(self.settings, pp, self.seq_len))

    def stage_layers(self, pp: int) -> int:
        """Blocks on the fullest pipeline stage."""
        return max(self.stage_blocks(pp))

    @lru_cache(maxsize=None)
    def stage_params(self, pp: int) -> tuple[float, float]:
        """Parameters held by the first and by the last pipeline stage (the same stage when pp = 1):
        the first holds the embedding, the last the final norm and the (untied) head."""
        blocks = self.stage_blocks(pp)
        head = 0 if self.settings.tie_embeddings else self.embedding_params
        if pp == 1:
            return (blocks[0] * self.layer_params + self.embedding_params + head,) * 2
        return (blocks[0] * self.layer_params + self.embedding_params,
                blocks[-1] * self.layer_params + head + self.settings.dim)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the busiest stage, by kind."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    fragmentation: float
    runtime: float

    @property
    def allocated(self) -> float:
        """What PyTorch's allocator hands out: the total without fragmentation and the runtime's reserve."""
        return self.total - self.fragmentation - self.runtime

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.logits + self.buffers
                + self.fragmentation + self.runtime)

    def as_gib(self) -> dict[str, float]:
        """Every part in GiB, and the total."""
        parts = {k: getattr(self, k) / GiB for k in ("params", "grads", "optimizer", "activations", "logits",
                                                     "buffers", "fragmentation", "runtime")}
        return {**{k: round(v, 2) for k, v in parts.items()}, "total": round(self.total / GiB, 2)}


def estimate_memory(facts: ModelFacts, layout: Layout, optimizer: str = "adamw",
                    microbatches: int | None = None, compute_bytes: int = 2, compiled: bool = True
                    ) -> MemoryEstimate:
    """Peak bytes per GPU for `layout` (the larger of the first and last pipeline stage).

    microbatches: micro-batches per step per pipeline; a 1F1B pipeline keeps min(pp, microbatches) of them
    in flight on its first stage (default: pp). compute_bytes: of activations, logits and gathered
    parameters (2: bf16; 4: float32). compiled: blocks under torch.compile (eager saves more).
    """
    s = facts.settings
    tp, pp = layout.tp, layout.pp
    shard = layout.dp_shard * tp
    tokens = layout.micro_batch_size * facts.seq_len
    in_flight = min(pp, microbatches) if microbatches else pp
    layers = facts.stage_layers(pp)

    per_block = facts.activation_elements_per_token(compiled) * compute_bytes * tokens / tp
    if layout.activation_checkpointing == "full":
        stored = layers * compute_bytes * s.dim * tokens / tp  # each block's input
        recompute = per_block
    else:
        stored, recompute = layers * per_block, 0.0
    activation_grads = 2 * compute_bytes * s.dim * tokens / tp  # gradient flowing between blocks, two live at once
    buffers = 0.0
    if layout.dp_shard > 1:  # FSDP's gathered copies; one process, DDP and TP alone keep none
        unit = max(facts.layer_params, facts.embedding_params) / tp
        buffers = unit * (2 * compute_bytes + 4)  # gathered unit + prefetched unit + unsharded fp32 gradient
        if not layout.reshard_after_forward:
            buffers += max(facts.stage_params(pp)) / tp * compute_bytes

    first_params, last_params = facts.stage_params(pp)
    first_acts = stored * in_flight + recompute + activation_grads
    last_acts = stored + recompute + activation_grads
    # The logits, their fp32 copy for the loss (none when they are fp32 already) and its fp32 gradient.
    logits = tokens * s.vocab_size * (compute_bytes + (0 if compute_bytes == 4 else 4) + 4) / tp
    state_bytes = STATE_BYTES_PER_PARAM[optimizer]

    candidates = []
    for params, acts, loss in ((first_params, first_acts, logits if pp == 1 else 0.0),
                               (last_params, last_acts, logits)):
        p = params / shard
        allocated = p * state_bytes + acts + loss + buffers
        candidates.append(MemoryEstimate(
            params=4 * p, grads=4 * p, optimizer=(state_bytes - 8) * p, activations=acts, logits=loss,
            buffers=buffers, fragmentation=FRAGMENTATION * allocated, runtime=RUNTIME_RESERVE_BYTES))
    return max(candidates, key=lambda m: m.total)
