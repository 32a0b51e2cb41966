"""Enumerate parallel layouts, keep those that fit, rank them by estimated throughput.

The cost model, per micro-batch on one GPU (everything else is assumed to overlap perfectly):

- compute: the model FLOPs of its tokens on its share of the model (1/tp of each block, 1/pp of the
  blocks), plus one extra forward under full activation checkpointing, at `efficiency` x peak;
- tensor parallel: with sequence parallelism each block does 2 all-gathers and 2 reduce-scatters of the
  activations forward and as many backward (again on recomputation), (tp-1)/tp x tokens x dim x 2 bytes
  each, over NVLink, never hidden;
- FSDP: every micro-batch all-gathers the stage's bf16 parameters twice (forward, and backward after
  resharding; once when train.parallel.reshard_after_forward is off) and reduce-scatters fp32 gradients
  once, (n-1)/n x the stage's bytes / tp, over NVLink when the shard group fits in a node, else over the NICs; prefetching hides it behind compute, so only the
  excess over compute counts;
- HSDP: once per step the replicas all-reduce their gradient shards (2 (r-1)/r x bytes), hidden behind
  the last micro-batch's backward when it is shorter;
- pipeline: activations cross each stage boundary forward and backward (v times with v interleaved
  chunks), and the 1F1B bubble adds (pp-1)/v micro-batch slots to the m a step needs. The stages are
  cut as the trainer cuts them (murmur.train.pipeline.split_layers); a model with a tied head gets no
  pipeline (the trainer refuses it: the embedding and the head would be on different stages).

step time = (m + (pp-1)/v) x (compute + tp + exposed FSDP + p2p) + exposed all-reduce.
Throughput is the global batch over the step time; MFU is model FLOPs over (step time x GPUs x peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from murmur.errors import MurmurError
from murmur.plan.gpus import GPU, GPUS
from murmur.plan.memory import GiB, Layout, MemoryEstimate, ModelFacts, estimate_memory

COLLECTIVE_EFFICIENCY = 0.8  # NCCL bus bandwidth reaches about 80% of the link's nominal rate
MAX_MICRO_BATCH = 64
MAX_PIPELINE = 64


class NoLayoutError(MurmurError):
    """No layout of this model fits on these GPUs; the message says what would."""


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its memory and its estimated speed."""

    layout: Layout
    memory: MemoryEstimate
    microbatches: int  # per optimizer step, per pipeline (gradient accumulation)
    global_batch_tokens: int
    step_seconds: float
    tokens_per_second: float
    mfu: float
    times: dict[str, float] = field(default_factory=dict)  # seconds per micro-batch slot, by cause

    def headroom(self, gpu: GPU) -> float:
        """Share of the GPU's memory left free."""
        return 1 - self.memory.total / gpu.memory_bytes


@dataclass(frozen=True)
class SearchResult:
    """Every fitting layout, fastest first, and how many were tried."""

    candidates: list[Candidate]
    tried: int

    @property
    def best(self) -> Candidate:
        return self.candidates[0]



def divisors(n: int) -> list[int]:
    """All divisors of n, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def tensor_parallel_degrees(facts: ModelFacts, gpus_per_node: int) -> list[int]:
    """TP degrees that stay inside a node and split the heads and the MLP width evenly (as the trainer requires)."""
    s = facts.settings
    return [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and gpus_per_node % t == 0
            and s.n_heads % t == 0 and s.kv_heads % t == 0 and s.hidden_dim % t == 0]


def pipeline_degrees(facts: ModelFacts, world: int, tp: int, gpus_per_node: int) -> list[int]:
    """PP degrees: 1, or a split across whole nodes with at least one block per stage (an untied head only)."""
    if world % tp:
        return []
    rest = world // tp
    per_node = gpus_per_node // tp
    deepest = 1 if facts.settings.tie_embeddings else min(MAX_PIPELINE, facts.settings.n_layers)
    return [p for p in divisors(rest) if p <= deepest and (p == 1 or (rest // p) % per_node == 0)]


def virtual_stages(facts: ModelFacts, pp: int, microbatches: int) -> int:
    """Interleaved stages per pipeline rank: up to 8, one block each at least, when the micro-batches divide
    evenly among the ranks (Interleaved1F1B's rule); 1 otherwise (plain 1F1B)."""
    if pp == 1 or microbatches % pp:
        return 1
    return max(v for v in (1, 2, 4, 8) if pp * v <= facts.settings.n_layers)


def bubble_slots_1f1b(pp: int, virtual: int = 1) -> float:
    """Idle micro-batch slots a (interleaved) 1F1B step adds on each pipeline rank: (pp - 1) / v."""
    return (pp - 1) / virtual


def bubble_fraction(pp: int, virtual: int, microbatches: int) -> float:
    """The share of a pipeline step spent idle: bubble slots over all slots of the step."""
    slots = bubble_slots_1f1b(pp, virtual)
    return slots / (microbatches + slots)


class CostModel:
    """Step time of a layout on a GPU, by the rules in this module's docstring."""

    def __init__(self, facts: ModelFacts, gpu: GPU, gpus_per_node: int, efficiency: float,
                 gather_once_per_step: bool = False):
        """gather_once_per_step: communicate parameters and gradients once per optimizer step instead of once
        per micro-batch (Megatron's distributed optimizer, as Llama 3 ran; not what FSDP2 does)."""
        self.facts, self.gpu, self.gpus_per_node = facts, gpu, gpus_per_node
        self.gather_once_per_step = gather_once_per_step
        self.intra = gpu.intra_node_bandwidth * COLLECTIVE_EFFICIENCY
        self.inter = gpu.inter_node_bandwidth * COLLECTIVE_EFFICIENCY
        self.flops_rate = gpu.peak_bf16_flops * efficiency

    def step(self, layout: Layout, microbatches: int) -> tuple[float, dict[str, float]]:
        """Seconds per optimizer step, and the seconds per micro-batch spent on each cause."""
        f, s = self.facts, self.facts.settings
        tp, pp, m, v = layout.tp, layout.pp, microbatches, layout.virtual_stages
        tokens = layout.micro_batch_size * f.seq_len
        full = layout.activation_checkpointing == "full"
        t_compute = f.flops_per_token * tokens / (tp * pp) * (4 / 3 if full else 1.0) / self.flops_rate
        tp_collectives = (12 if full else 8) * f.stage_layers(pp)
        t_tp = tp_collectives * (tp - 1) / tp * tokens * s.dim * 2 / self.intra if tp > 1 else 0.0
        t_p2p = 2 * v * tokens * s.dim * 2 / tp / self.inter if pp > 1 else 0.0
        shard_bytes = max(f.stage_params(pp)) / tp
        n = layout.dp_shard
        bw_shard = self.intra if tp * n <= self.gpus_per_node else self.inter
        gathers = 1 if (self.gather_once_per_step or not layout.reshard_after_forward) else 2
        t_fsdp = (n - 1) / n * shard_bytes * (2 * gathers + 4) / bw_shard if n > 1 else 0.0
        if self.gather_once_per_step:
            t_fsdp /= m
        exposed_fsdp = max(0.0, t_fsdp - t_compute)
        r = layout.dp_replicate
        bw_rep = self.intra if tp * layout.dp <= self.gpus_per_node else self.inter
        t_ar = 2 * (r - 1) / r * shard_bytes / n * 4 / bw_rep if r > 1 else 0.0
        exposed_ar = max(0.0, t_ar - t_compute * 2 / 3)
        slot = t_compute + t_tp + exposed_fsdp + t_p2p
        bubble_slots = bubble_slots_1f1b(pp, v)
        step = (m + bubble_slots) * slot + exposed_ar
        return step, {"compute": t_compute, "tp": t_tp, "fsdp_exposed": exposed_fsdp, "p2p": t_p2p,
                      "bubble": bubble_slots * slot / m, "allreduce_exposed": exposed_ar / m}

    def candidate(self, layout: Layout, microbatches: int, memory: MemoryEstimate) -> Candidate:
        """The layout with its estimated speed."""
        step, times = self.step(layout, microbatches)
        batch = layout.dp * layout.micro_batch_size * self.facts.seq_len * microbatches
        mfu = self.facts.flops_per_token * batch / (step * layout.world * self.gpu.peak_bf16_flops)
        return Candidate(layout, memory, microbatches, batch, step, batch / step, mfu, times)


def search(facts: ModelFacts, gpu: GPU, world: int, gpus_per_node: int, efficiency: float,
           global_batch_tokens: int | None, target_batch_tokens: int, optimizer: str = "adamw") -> SearchResult:
    """All layouts of `world` GPUs that fit in `gpu`'s memory, fastest first.

    global_batch_tokens: an exact batch every layout must reproduce (sequences divisible by dp x micro-batch),
    or None to let each layout round `target_batch_tokens` to what its data-parallel degree allows.
    A pipeline needs at least pp micro-batches per step; it interleaves up to 8 chunks per rank when the
    micro-batches divide evenly among the stages.
    """
    seq = facts.seq_len
    cost = CostModel(facts, gpu, gpus_per_node, efficiency)
    fixed_sequences = global_batch_tokens // seq if global_batch_tokens else None
    candidates: list[Candidate] = []
    tried = 0
    for tp in tensor_parallel_degrees(facts, gpus_per_node):
        for pp in pipeline_degrees(facts, world, tp, gpus_per_node):  # divisors of world // tp only
            dp = world // (tp * pp)
            shards = divisors(dp)
            for ac in ("none", "full"):
                for mbs in (2**i for i in range(int(math.log2(MAX_MICRO_BATCH)) + 1)):
                    tokens = mbs * seq
                    if fixed_sequences is not None:
                        if dp * mbs > fixed_sequences:
                            break
                        if fixed_sequences % (dp * mbs):
                            continue
                        m = fixed_sequences // (dp * mbs)
                    else:
                        if mbs > 1 and dp * tokens * max(1, pp) > target_batch_tokens:
                            break
                        m = max(1, round(target_batch_tokens / (dp * tokens)))
                    if m < pp:
                        if fixed_sequences is not None:
                            continue
                        m = pp
                    virtual = virtual_stages(facts, pp, m)
                    fits_any = False
                    for dp_shard in shards:
                        for reshard in (True, False) if dp_shard > 1 else (True,):
                            tried += 1
                            layout = Layout(dp // dp_shard, dp_shard, tp, pp, mbs, ac, virtual, reshard)
                            mem = estimate_memory(facts, layout, optimizer, microbatches=m)
                            if mem.total <= gpu.memory_bytes:
                                fits_any = True
                                candidates.append(cost.candidate(layout, m, mem))
                    if not fits_any:
                        break  # a larger micro-batch needs more memory still
    # Fastest first; among equals, the one with the most memory to spare.
    candidates.sort(key=lambda c: (-round(c.tokens_per_second, 6), c.memory.total))
    return SearchResult(candidates, tried)


def min_memory(facts: ModelFacts, gpu: GPU, world: int, gpus_per_node: int, optimizer: str = "adamw") -> float:
    """The least memory any layout of `world` GPUs needs (micro-batch 1, full checkpointing, full sharding)."""
    best = math.inf
    for tp in tensor_parallel_degrees(facts, gpus_per_node):
        for pp in pipeline_degrees(facts, world, tp, gpus_per_node):
            dp = world // (tp * pp)
            mem = estimate_memory(facts, Layout(1, dp, tp, pp, 1, "full"), optimizer)
            best = min(best, mem.total)
    return best


def explain_no_fit(facts: ModelFacts, gpu: GPU, world: int, gpus_per_node: int, optimizer: str = "adamw") -> str:
    """Why nothing fits, and what would: the fewest GPUs of this kind, or another GPU at this count."""
    need = min_memory(facts, gpu, world, gpus_per_node, optimizer)
    parts = [f"no layout of this {facts.params / 1e9:.1f}B-parameter model fits on {world} x {gpu.name} "
             f"({gpu.memory_bytes / GiB:.0f} GiB each): the leanest layout needs {need / GiB:.0f} GiB per GPU"]
    nodes = max(1, world // gpus_per_node)
    while nodes <= 2**17 // gpus_per_node:
        nodes *= 2
        if min_memory(facts, gpu, nodes * gpus_per_node, gpus_per_node, optimizer) <= gpu.memory_bytes:
            parts.append(f"it fits on {nodes * gpus_per_node} x {gpu.name}")
            break
    others = [g.name for g in GPUS.values() if g.name != gpu.name and g.gpus_per_node >= gpus_per_node
              and min_memory(facts, g, world, gpus_per_node, optimizer) <= g.memory_bytes]
    if others:
        parts.append(f"or on {world} x {' / '.join(others)}")
    if len(parts) == 1:
        parts.append("use more GPUs, a shorter --seq-len or a smaller model")
    return "; ".join(parts)
