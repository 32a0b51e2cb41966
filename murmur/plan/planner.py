"""One plan: a model (or the largest compute-optimal one), a layout, and the schedule it implies.

    plan = make_plan(PlanRequest(gpu="h100-sxm", gpus=10_000, days=30))
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from murmur.errors import MurmurError
from murmur.files import read_jsonl
from murmur.plan import schedule as sched
from murmur.plan.gpus import GPU, get_gpu
from murmur.plan.memory import GiB, ModelFacts
from murmur.plan.search import (
    Candidate,
    NoLayoutError,
    SearchResult,
    explain_no_fit,
    search,
)
from murmur.plan.shapes import shape_for_params
from murmur.settings.model import ModelSettings

DEFAULT_EFFICIENCY = 0.5  # MFU with nothing stalling: torchtitan's 8B FSDP on 8 H100 reaches 33-39% with AC
DEFAULT_SEQ_LEN = 8192


@dataclass
class PlanRequest:
    """What the user asked for; None means "work it out"."""

    gpu: str
    gpus: int
    model: ModelSettings | None = None  # a preset or shape; None with params or a budget
    params: float | None = None
    tokens: float | None = None
    budget_flops: float | None = None
    days: float | None = None
    gpus_per_node: int | None = None
    seq_len: int | None = None
    global_batch_tokens: int | None = None
    price_per_gpu_hour: float | None = None
    efficiency: float = DEFAULT_EFFICIENCY
    failures_per_gpu_hour: float = sched.LLAMA3_FAILURES_PER_GPU_HOUR
    checkpoint_seconds: float = sched.DEFAULT_CHECKPOINT_SECONDS
    restart_seconds: float = sched.DEFAULT_RESTART_SECONDS
    optimizer: str = "adamw"


@dataclass
class Plan:
    """The outcome: the model, every layout that fits (fastest first), and the schedule of the best one."""

    request: PlanRequest
    gpu: GPU
    gpus_per_node: int
    facts: ModelFacts
    result: SearchResult
    schedule: sched.Schedule
    goal: str  # how the token count was chosen
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.result.best

    def as_dict(self, top: int = 10) -> dict:
        """Plain data for --json."""
        f = self.facts
        s = f.settings
        return {
            "gpu": {"name": self.gpu.name, "label": self.gpu.label, "count": self.request.gpus,
                    "gpus_per_node": self.gpus_per_node, "memory_gib": self.gpu.memory_bytes / GiB,
                    "peak_bf16_tflops": self.gpu.peak_bf16_flops / 1e12},
            "model": {"preset": s.preset, "parameters": f.params, "non_embedding_parameters": f.non_embedding_params,
                      "dim": s.dim, "n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.kv_heads,
                      "ffn_dim": s.hidden_dim, "vocab_size": s.vocab_size, "seq_len": f.seq_len,
                      "train_flops_per_token": f.flops_per_token,
                      "chinchilla_tokens": sched.chinchilla_tokens(f.params)},
            "goal": self.goal,
            "efficiency": self.request.efficiency,
            "layouts_tried": self.result.tried,
            "layouts_fitting": len(self.result.candidates),
            "layouts": [candidate_dict(c, self.gpu) for c in self.result.candidates[:top]],
            "recipe_layout": candidate_dict(self.best, self.gpu),  # what --write puts in recipe.toml
            "schedule": self.schedule.as_dict(),
            "notes": self.notes,
        }


def candidate_dict(c: Candidate, gpu: GPU) -> dict:
    """One layout as plain data."""
    lay = c.layout
    return {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp,
            "virtual_stages": lay.virtual_stages, "pp_schedule": pp_schedule(lay),
            "micro_batch_size": lay.micro_batch_size,
            "activation_checkpointing": lay.activation_checkpointing,
            "reshard_after_forward": lay.reshard_after_forward, "grad_accumulation": c.microbatches,
            "global_batch_tokens": c.global_batch_tokens, "memory_gib": c.memory.as_gib(),
            "headroom": c.headroom(gpu), "step_seconds": c.step_seconds, "tokens_per_second": c.tokens_per_second,
            "mfu": c.mfu, "seconds_per_microbatch": c.times}


def pp_schedule(layout) -> str:
    """The trainer's pipeline schedule for a planned layout (train.parallel.pp_schedule)."""
    return "Interleaved1F1B" if layout.virtual_stages > 1 else "1F1B"


def calibrated_efficiency(metrics_path: str | Path) -> float:
    """The median MFU a Murmur run logged (metrics.jsonl), leaving out its first tenth (compile, warm-up)."""
    path = Path(metrics_path)
    if not path.is_file():
        raise MurmurError(f"--calibrate-from {path}: no such file; pass a run's pretrain/metrics.jsonl")
    # A run killed mid-write leaves its last line cut short: read_jsonl skips it.
    values = [float(r["mfu"]) for r in read_jsonl(path) if isinstance(r.get("mfu"), (int, float)) and r["mfu"] > 0]
    if not values:
        raise MurmurError(f"--calibrate-from {path}: no record has an mfu (runs on CPU log null); "
                          "calibrate from a GPU run")
    kept = values[len(values) // 10:] or values
    mfu = statistics.median(kept)
    if not 0 < mfu <= 1:
        raise MurmurError(f"--calibrate-from {path}: median mfu {mfu} is not between 0 and 1")
    return mfu


def _layout_search(facts: ModelFacts, gpu: GPU, req: PlanRequest, gpus_per_node: int, flops: float) -> SearchResult:
    if req.global_batch_tokens and req.global_batch_tokens % facts.seq_len:
        raise MurmurError(f"--global-batch-tokens {req.global_batch_tokens} is not a multiple of the sequence "
                          f"length {facts.seq_len}; use a multiple, or set --seq-len")
    target = max(facts.seq_len, int(sched.optimal_batch_tokens(flops)))
    result = search(facts, gpu, req.gpus, gpus_per_node, req.efficiency, req.global_batch_tokens, target,
                    req.optimizer)
    if result.candidates:
        return result
    if req.global_batch_tokens:
        relaxed = search(facts, gpu, req.gpus, gpus_per_node, req.efficiency, None, target, req.optimizer)
        if relaxed.candidates:
            need = min(c.layout.dp * c.layout.micro_batch_size for c in relaxed.candidates) * facts.seq_len
            raise MurmurError(
                f"no layout of {req.gpus} GPUs divides a global batch of {req.global_batch_tokens} tokens "
                f"({req.global_batch_tokens // facts.seq_len} sequences of {facts.seq_len}) evenly; use a "
                f"multiple of {need} tokens, or leave --global-batch-tokens out to let the planner choose")
    raise NoLayoutError(explain_no_fit(facts, gpu, req.gpus, gpus_per_node, req.optimizer))


def _facts_for(req: PlanRequest, params: float | None) -> ModelFacts:
    if req.model is not None:
        model = req.model
    else:
        model = shape_for_params(params, max_seq_len=req.seq_len or DEFAULT_SEQ_LEN)
    seq_len = req.seq_len or min(model.max_seq_len, DEFAULT_SEQ_LEN)
    if seq_len > model.max_seq_len:
        model = model.model_copy(update={"max_seq_len": seq_len})
    return ModelFacts(model, seq_len)


def make_plan(req: PlanRequest) -> Plan:
    """Choose the model (if not given), search the layouts, and schedule the fastest one."""
    gpu = get_gpu(req.gpu)
    gpus_per_node = min(req.gpus_per_node or gpu.gpus_per_node, req.gpus)
    if req.gpus % gpus_per_node:
        raise MurmurError(f"--gpus {req.gpus} is not a whole number of {gpus_per_node}-GPU nodes; "
                          f"use a multiple of {gpus_per_node} or set --gpus-per-node")
    reliability = sched.Reliability(req.failures_per_gpu_hour, req.checkpoint_seconds, req.restart_seconds,
                                    req.gpus)
    seconds = req.days * 86400 if req.days else None
    notes: list[str] = []
    has_model = req.model is not None or req.params is not None

    if has_model:
        facts = _facts_for(req, req.params)
        if req.tokens:
            tokens, goal = req.tokens, "tokens given"
        elif req.budget_flops:
            tokens, goal = req.budget_flops / facts.flops_per_token, "tokens that spend the FLOP budget"
        elif seconds:
            tokens, goal = None, f"tokens trainable in {req.days:g} days"
        else:
            tokens = sched.chinchilla_tokens(facts.params)
            goal = "compute-optimal tokens (Chinchilla, 20 per parameter)"
        guess = tokens if tokens else sched.chinchilla_tokens(facts.params)
        result = _layout_search(facts, gpu, req, gpus_per_node, facts.flops_per_token * guess)
        if tokens is None:
            tokens = result.best.tokens_per_second * seconds * reliability.goodput
            # The batch size follows the compute actually spent: search once more with it.
            result = _layout_search(facts, gpu, req, gpus_per_node, facts.flops_per_token * tokens)
            tokens = result.best.tokens_per_second * seconds * reliability.goodput
    else:
        if req.budget_flops:
            budget, goal = req.budget_flops, "largest compute-optimal model for the FLOP budget"
        elif seconds:
            budget = None
            goal = f"largest compute-optimal model trainable in {req.days:g} days"
        else:
            raise MurmurError("give a model (--preset, --params or the shape flags) or a budget (--budget-flops or "
                              "--days) to size one")
        # The budget in days depends on the MFU the chosen model reaches: iterate to a fixed point.
        delivered = budget or (req.gpus * gpu.peak_bf16_flops * req.efficiency * seconds * reliability.goodput)
        for _ in range(6):
            params = sched.compute_optimal_params(delivered)
            facts = _facts_for(req, params)
            tokens = sched.chinchilla_tokens(facts.params)
            result = _layout_search(facts, gpu, req, gpus_per_node, 6 * facts.params * tokens)
            if budget:
                break
            trainable = result.best.tokens_per_second * seconds * reliability.goodput
            new = 6 * facts.params * trainable
            if abs(new - delivered) / delivered < 0.01:
                break
            delivered = new
        if not budget:
            tokens = result.best.tokens_per_second * seconds * reliability.goodput
        notes.append(f"model sized by Chinchilla's rule (D = 20 N, C = 6 N D): C = {6 * facts.params * tokens:.3g} "
                     f"FLOPs ({facts.flops_per_token * tokens:.3g} counting attention)")

    best = result.best
    optimal_batch = sched.optimal_batch_tokens(6 * facts.params * tokens)
    if best.global_batch_tokens > 2 * optimal_batch:
        notes.append(f"the global batch ({best.global_batch_tokens / 1e6:.0f}M tokens, at least one sequence per "
                     f"data-parallel rank) is {best.global_batch_tokens / optimal_batch:.0f}x the loss-optimal batch "
                     f"for this compute (DeepSeek LLM's fit: {optimal_batch / 1e6:.1f}M); so wide a data-parallel "
                     "run spends more tokens for the same loss: fewer GPUs, or a larger model, use them better")
    schedule = sched.Schedule(tokens, facts.flops_per_token * tokens, best.tokens_per_second, req.gpus, reliability,
                              req.price_per_gpu_hour)
    return Plan(req, gpu, gpus_per_node, facts, result, schedule, goal, notes)
