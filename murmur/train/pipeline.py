"""Pipeline parallelism: the model cut into stages by layer, and the schedule that runs them.

`split_layers` places the blocks on `pp × virtual_stages` stages so that the busiest stage does as
little work as it can, by the FLOPs the planner's cost model counts (murmur/plan/search.py): a block
costs its 6N matmul FLOPs plus attention per token, the output head 6 × vocab × dim, the embedding
lookup nothing. The embedding always goes with the first stage, the final norm and the head with the
last; each stage holds at least one block.

`build_pipeline` makes this rank's stage modules the way torchtitan does: a copy of the whole
`Transformer` per stage with the other blocks deleted and the embedding, norm and head set to None
where they do not belong. The blocks stay in a ModuleDict under their own index, so every parameter
keeps the name it has in the whole model and checkpoints reshard across pipeline degrees. Each stage
is then parallelised like a whole model (TP, activation checkpointing, compile, FSDP2) and handed to a
`torch.distributed.pipelining` schedule: 1F1B (one stage per rank), or Interleaved1F1B and
InterleavedZeroBubble (`virtual_stages` stages per rank, looped: stage s on rank s mod pp).

What torch 2.13 cannot run, the settings refuse (measured on gloo, docs/train.md):
InterleavedZeroBubble with data parallelism computes wrong gradients under FSDP2 (the loss leaves the
one-process trajectory by 1e-3 at the second step); ZBVZeroBubble trains correctly but its forward-only
`eval()` still runs its backward actions ("can't steal_bwd_input if this stage doesn't have backward"),
so no validation can run through it. DDP's reducer fails under any schedule (an internal assertion on
rebuilt parameter indices), so replicas of a pipeline are FSDP2 with one shard (`Layout.sharded`).

The last stage's loss is the summed cross-entropy of a micro-batch times the step's scale (data-parallel
size / global target count), with the schedule's own gradient scaling off: the gradients are those of
the mean loss over the whole global batch, as without a pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from murmur.errors import MurmurError
from murmur.settings.model import ModelSettings
from murmur.shards import IGNORE_INDEX as IGNORE

SINGLE_STAGE_SCHEDULES = ("1F1B",)
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble",)


# --- where the blocks go -------------------------------------------------------------------------

def stage_costs(settings: ModelSettings, seq_len: int) -> tuple[float, float, float]:
    """Training FLOPs per token of (the embedding, one block, the final norm and head), as the planner counts."""
    from murmur.model import count_params

    d, hd = settings.dim, settings.attention_head_dim
    head = settings.vocab_size * d
    body = count_params(settings, embeddings=False) - d - (0 if settings.tie_embeddings else head)
    block = 6 * body / settings.n_layers + 12 * settings.n_heads * hd * seq_len
    return 0.0, block, 6.0 * head


def split_layers(settings: ModelSettings, stages: int, seq_len: int | None = None) -> list[range]:
    """The blocks of each of `stages` pipeline stages, in order, balanced by FLOPs (see the module docstring)."""
    n = settings.n_layers
    if stages < 1 or stages > n:
        raise MurmurError(f"a pipeline of {stages} stages needs at least {stages} blocks, one per stage; the "
                          f"model has {n}: lower train.parallel.pp or virtual_stages, or use a deeper model")
    embed, block, head = stage_costs(settings, seq_len or settings.max_seq_len)
    if stages == 1:
        return [range(n)]
    extra = [embed] + [0.0] * (stages - 2) + [head]

    def capacity(cap: float) -> list[int]:
        return [int((cap - e) // block + 1e-9) if cap >= e else 0 for e in extra]

    # The least cap on a stage's cost under which every stage holds one block or more and all blocks fit.
    caps = sorted({e + k * block for e in set(extra) for k in range(1, n + 1)})
    cap = next(c for c in caps if all(k >= 1 for k in capacity(c)) and sum(min(k, n) for k in capacity(c)) >= n)
    counts = [max(1, min(k, n)) for k in capacity(cap)]
    # Take the surplus off the costliest stages (later ones first on ties), one block at a time.
    while sum(counts) > n:
        i = max((i for i in range(stages) if counts[i] > 1), key=lambda i: (extra[i] + counts[i] * block, i))
        counts[i] -= 1
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def stage_ids(rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stages pipeline rank `rank` runs, in order (looped: stage s on rank s mod pp)."""
    return [rank + i * pp for i in range(virtual_stages)]


def check_pipeline(settings: ModelSettings, layout, microbatches: int, section: str = "train") -> None:
    """Refuse, with the setting to change, what the pipeline or torch's schedules cannot run."""
    pp, virtual_stages, schedule = layout.pp, layout.virtual_stages, layout.pp_schedule
    if pp == 1:
        return
    where = f"{section}.parallel"
    if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise MurmurError(f"{where}.pp_schedule={schedule} runs one stage per rank; set virtual_stages=1 or "
                          "pp_schedule=\"Interleaved1F1B\"")
    if schedule in ZERO_BUBBLE_SCHEDULES and layout.dp_size > 1:
        raise MurmurError(f"{where}.pp_schedule={schedule} with data parallelism (dp_replicate × dp_shard = "
                          f"{layout.dp_size}) computes wrong gradients in torch 2.13 (FSDP2); "
                          "use pp_schedule=\"Interleaved1F1B\", or zero bubble with pp × tp only")
    if settings.tie_embeddings:
        raise MurmurError(f"{where}.pp={pp} puts the embedding and the output head on different stages, so they "
                          "cannot share one weight: set model.tie_embeddings=false, or pp=1")
    split_layers(settings, pp * virtual_stages)  # enough blocks
    if schedule in SINGLE_STAGE_SCHEDULES and microbatches < pp:
        raise MurmurError(f"{where}.pp={pp} with {schedule} needs at least {pp} micro-batches per step, this "
                          f"setting gives {microbatches}; raise {section}.global_batch_tokens (or lower "
                          "micro_batch_size) so that each step accumulates at least pp micro-batches")
    rounds = max(1, microbatches // pp)
    if schedule not in SINGLE_STAGE_SCHEDULES and microbatches % rounds:
        raise MurmurError(f"{where}.pp_schedule={schedule} needs the micro-batches per step ({microbatches}) to "
                          f"be a multiple of {rounds} (their number // pp); change {section}.global_batch_tokens")


def build_stage_module(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of `model` holding only the blocks `layers` (named by their index in the whole model), the
    embedding only on the first stage and the final norm and head only on the last."""
    # Copy only what the stage keeps: the shell first, with the other parts detached for the copy.
    wanted = {"embed_tokens": first, "norm": last, "lm_head": last}
    saved = {name: getattr(model, name) for name in ("layers", *wanted)}
    try:
        model.layers = nn.ModuleList()
        for name, keep in wanted.items():
            if not keep:
                setattr(model, name, None)
        part = copy.deepcopy(model)
    finally:
        for name, module in saved.items():
            setattr(model, name, module)
    part.layers = nn.ModuleDict({str(i): copy.deepcopy(saved["layers"][i]) for i in layers})
    return part


# --- running it ----------------------------------------------------------------------------------

class PipelineLoss:
    """The loss function of the last stage: a micro-batch's summed cross-entropy times the step's `scale`.

    The unscaled sums are kept for the loss record; the schedule may call the function for shape inference
    before the real micro-batches, so a step reads only its last `microbatches` sums.
    """

    def __init__(self) -> None:
        self.scale: float | Tensor = 1.0
        self.sums: list[Tensor] = []

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        self.sums.append(loss_sum.detach())
        return loss_sum * self.scale

    def take(self, count: int, device: torch.device) -> Tensor:
        """The sum of the last `count` micro-batches' losses, and forget them all."""
        total = torch.stack(self.sums[-count:]).sum() if self.sums else torch.zeros((), device=device)
        self.sums.clear()
        return total


@dataclass
class Pipeline:
    """This rank's stages of the pipeline and the schedule that runs a step's micro-batches through them."""

    schedule: Any
    parts: list[nn.Module]  # the stage modules this rank runs, in stage order (parallelised)
    stage_ids: list[int]
    stages: int  # in all
    microbatches: int
    group: Any  # the pp process group
    device: torch.device
    loss: PipelineLoss = field(default_factory=PipelineLoss)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.stages - 1 in self.stage_ids

    def _run(self, inputs: Tensor, targets: Tensor, train: bool) -> Tensor:
        run = self.schedule.step if train else self.schedule.eval
        self.loss.sums.clear()
        if self.has_first:
            run(inputs, target=targets)
        else:
            run(target=targets)
        if not self.has_last:
            self.loss.sums.clear()
            return torch.zeros((), device=self.device)
        return self.loss.take(self.microbatches, self.device)

    def step(self, inputs: Tensor, targets: Tensor, scale: float | Tensor) -> Tensor:
        """Forward and backward of a step's micro-batches (inputs and targets: microbatches × B rows); the
        summed loss, the same on every rank of the pipeline."""
        self.loss.scale = scale
        total = self._run(inputs, targets, train=True)
        dist.all_reduce(total, group=self.group)  # only the last stage's ranks hold it
        return total

    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The summed loss of forward passes (on the last stage's ranks; zero on the others)."""
        self.loss.scale = 1.0
        return self._run(inputs, targets, train=False)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def build_pipeline(model: nn.Module, layout, mesh, device: torch.device, microbatches: int, seq_len: int,
                   parallelize_part: Callable[[nn.Module], nn.Module]) -> Pipeline:
    """Cut `model` (a whole Transformer, possibly on the meta device) into this rank's stages, parallelise
    each with `parallelize_part`, and build the schedule `layout.pp_schedule` over them."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    pp_mesh = mesh["pp"]
    rank, group = pp_mesh.get_local_rank(), pp_mesh.get_group()
    total = layout.stages
    ranges = split_layers(model.settings, total, seq_len)
    ids = stage_ids(rank, layout.pp, layout.virtual_stages)
    parts, stages = [], []
    for sid in ids:
        part = parallelize_part(build_stage_module(model, ranges[sid], sid == 0, sid == total - 1))
        parts.append(part)
        stages.append(PipelineStage(part, sid, total, device, group=group))
    loss = PipelineLoss()
    schedule_class = get_schedule_class(layout.pp_schedule)
    if issubclass(schedule_class, PipelineScheduleSingle):
        schedule = schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss, scale_grads=False)
    else:
        schedule = schedule_class(stages, n_microbatches=microbatches, loss_fn=loss, scale_grads=False)
    return Pipeline(schedule, parts, ids, total, microbatches, group, device, loss)
