"""The training loop shared by pretraining and chat finetuning (SFT).

    run_stage(settings, run_dir, "pretrain")   # token shards -> runs/NAME/pretrain/
    run_stage(settings, run_dir, "sft")        # masked conversations -> runs/NAME/sft/

One process, or one process per device under `torchrun`. Every optimizer step sees
`global_batch_tokens` tokens: micro-batches per process × processes × accumulation steps. The
loss of a step is the mean over every target token of the whole global batch (masked ones
excluded), whatever the split over processes, so one process and N processes compute the same
step. The loop holds no per-step host synchronisation on GPU except where a setting asks for it
(nan_policy="skip"); values leave the device at the log interval.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from murmur import accel
from murmur.errors import MurmurError
from murmur.files import write_json_atomic
from murmur.model import Transformer, count_params, flops_per_token
from murmur.settings.model import ModelSettings
from murmur.settings.train import TrainSettings, section_name, training_settings
from murmur.shards import IGNORE_INDEX as IGNORE
from murmur.source import Source, resolve_training_start
from murmur.train import budget as time_budget
from murmur.train import checkpoint as ckpt
from murmur.train.metrics import IntervalMeter, MetricsLogger, peak_flops_note
from murmur.train.lora import apply_lora, check_lora_layout, lora_settings, reset_adapters
from murmur.train.optim import build_optimizers, lr_multiplier, set_learning_rate
from murmur.train.parallel import (Layout, build_mesh, check_model_fits_layout, data_rank, parallelize,
                                   resolve_layout)
from murmur.train.pipeline import Pipeline, build_pipeline, check_pipeline

# Models above this size are built on the meta device and initialised after sharding when sharded.
META_INIT_PARAMS = 1_000_000_000


# --- processes and devices -----------------------------------------------------------------------

@dataclass
class Runtime:
    """Where this process runs: its rank among `world_size` and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_runtime(ts: TrainSettings) -> Runtime:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    want = ts.device
    if want == "cuda" and not torch.cuda.is_available():
        raise MurmurError("train.device=cuda but no CUDA device is visible; set train.device=cpu or auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the cores among the processes of this node instead of oversubscribing them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // local_world))
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        owns = True
    return Runtime(rank, world, local_rank, local_world, device, owns)


def _all_reduce(tensor: Tensor, op=None) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


# --- the plan of a stage -------------------------------------------------------------------------

@dataclass
class StagePlan:
    """Everything derived from the settings and the world size, before any tensor exists."""

    stage: str
    ts: TrainSettings
    model: ModelSettings
    layout: Layout
    accumulation: int
    tokens_per_step: int

    def describe(self) -> list[str]:
        m, ts = self.model, self.ts
        return [
            f"stage        {self.stage}",
            f"model        {count_params(m) / 1e6:.2f}M parameters (dim {m.dim}, {m.n_layers} layers, "
            f"vocab {m.vocab_size}); {flops_per_token(m, ts.seq_len):.3e} training FLOPs/token",
            f"layout       {self.layout.describe()}",
            f"batch        {ts.micro_batch_size} seqs × {ts.seq_len} tokens per process × {self.layout.dp_size} "
            f"data-parallel × {self.accumulation} {'pipeline micro-batches' if self.layout.pipelined else 'accumulation'}"
            f" = {self.tokens_per_step:,} tokens per step",
            f"schedule     {ts.steps} steps ({ts.steps * self.tokens_per_step:,} tokens), {ts.optimizer} lr {ts.lr:g}, "
            f"{ts.schedule} after {ts.warmup_steps} warmup steps",
            f"precision    dtype {ts.dtype}, compile {ts.compile}, activation checkpointing "
            f"{ts.activation_checkpointing}",
            f"checkpoints  every {ts.checkpoint_interval} steps, keep {ts.keep_checkpoints}"
            f"{', async' if ts.async_checkpoint else ''}",
        ]


def make_plan(settings, stage: str, world_size: int, model: ModelSettings | None = None) -> StagePlan:
    """Validate the stage's settings against the world size; the errors name the setting to change."""
    ts, section = training_settings(settings, stage), section_name(stage)
    model = model or settings.model
    layout = resolve_layout(ts.parallel, world_size)
    check_model_fits_layout(layout, model.n_heads, model.kv_heads, model.hidden_dim)
    if layout.pipelined and ts.global_batch_tokens == 0:
        raise MurmurError(f"{section}.parallel.pp={layout.pp} runs several micro-batches per step through the "
                          f"pipeline: set {section}.global_batch_tokens to a multiple of seq_len × micro_batch_size "
                          f"× data-parallel processes × pp (at least pp micro-batches per step)")
    if ts.seq_len > model.max_seq_len:
        raise MurmurError(f"{section}.seq_len={ts.seq_len} exceeds model.max_seq_len={model.max_seq_len}; "
                          "lower the first or raise the second")
    per_round = ts.seq_len * ts.micro_batch_size * layout.dp_size
    if ts.global_batch_tokens == 0:
        accumulation = 1
    elif ts.global_batch_tokens % per_round:
        raise MurmurError(f"{section}.global_batch_tokens={ts.global_batch_tokens} is not a multiple of seq_len × "
                          f"micro_batch_size × data-parallel processes = {ts.seq_len} × {ts.micro_batch_size} × "
                          f"{layout.dp_size} = {per_round}; make it a multiple, or 0 for one micro-batch per process")
    else:
        accumulation = ts.global_batch_tokens // per_round
    check_lora_layout(ts, layout, section)
    check_pipeline(model, layout, accumulation, section)
    return StagePlan(stage, ts, model, layout, accumulation, per_round * accumulation)


# --- the run folder ------------------------------------------------------------------------------

def _fingerprint(plan: StagePlan) -> dict[str, Any]:
    """What must match for a stage folder to be resumed rather than refused."""
    adapters = lora_settings(plan.ts)  # LoRA checkpoints hold other tensors than full finetuning's
    return {"stage": plan.stage, "model": plan.model.model_dump(mode="json", exclude={"preset"}),
            "seq_len": plan.ts.seq_len, "optimizer": plan.ts.optimizer,
            **({"lora": adapters.record()} if adapters else {})}


def _claim_stage_dir(stage_dir: Path, plan: StagePlan, overwrite: bool, rt: Runtime) -> None:
    """Create or reuse the stage folder; refuse one that belongs to another configuration."""
    marker = stage_dir / "run.json"
    wanted = _fingerprint(plan)
    if rt.is_main:
        if overwrite and stage_dir.exists():
            shutil.rmtree(stage_dir)
        if marker.is_file():
            found = json.loads(marker.read_text())
            if found != wanted:
                diff = [k for k in {**found, **wanted} if found.get(k) != wanted.get(k)]  # LoRA's key: either side
                if "model" in diff:
                    diff = ["model." + k for k in wanted["model"] if found.get("model", {}).get(k) !=
                            wanted["model"][k]] or ["model"]
                raise MurmurError(f"{stage_dir} belongs to a run with different settings ({', '.join(diff)}); "
                                  "pass --overwrite to start it over, or set run.name / run.dir to another folder")
        elif stage_dir.is_dir() and any(stage_dir.iterdir()):
            raise MurmurError(f"{stage_dir} exists but was not written by `murmur train`; pass --overwrite to "
                              "replace it, or choose another run.dir")
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, wanted, durable=True)
    if dist.is_initialized():
        dist.barrier()


# --- data ----------------------------------------------------------------------------------------

def _tokens_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tokens"


def _open_loader(run_dir: Path, stage: str, split: str, ts: TrainSettings, rank: int, world: int, loop: bool):
    from murmur.shards import TokenLoader

    return TokenLoader(_tokens_dir(run_dir), kind=stage, split=split, seq_len=ts.seq_len,
                       batch_size=ts.micro_batch_size, rank=rank, world_size=world, seed=ts.seed, loop=loop)


def _bytes_tokenizer(run_dir: Path, tokenizer_dir: Path | None) -> Path | None:
    """The tokenizer whose pieces give bytes per token: the model's, else the copy beside the shards."""
    for folder in (tokenizer_dir, _tokens_dir(run_dir)):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return folder
    return None


def _has_split(run_dir: Path, stage: str, split: str) -> bool:
    folder = _tokens_dir(run_dir) / stage / split
    return folder.is_dir() and any(folder.iterdir())


def token_byte_lengths(tokenizer_dir: Path | None, vocab_size: int) -> Tensor | None:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte; None without a tokenizer."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer
    from tokenizers.decoders import ByteLevel

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special} if hasattr(
        tok, "get_added_tokens_decoder") else set()
    byte_level = isinstance(tok.decoder, ByteLevel)
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if idx >= vocab_size or idx in special:
            continue
        # Byte-level BPE spells every byte as one character; otherwise count the UTF-8 of the piece.
        lengths[idx] = len(token) if byte_level else len(token.replace("▁", " ").encode("utf-8"))
    return lengths


def _pad_rows(batch: dict[str, Tensor], blank: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch with the rows of a full one: the missing rows taken from `blank` (targets that take no loss)."""
    rows = batch["inputs"].shape[0]
    if rows == blank["inputs"].shape[0]:
        return batch
    return {key: torch.cat([batch[key], blank[key][rows:]]) for key in ("inputs", "targets")}


# --- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """One stage of training in one process (of possibly many). `setup()` then `train()`."""

    def __init__(self, settings, run_dir: Path, stage: str, rt: Runtime, overwrite: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock  # for the time budget (a test passes a fake one)
        self.started = clock()  # the budget counts from here: setup and the first validation are in it
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.rt = rt
        self.overwrite = overwrite
        self.ts = training_settings(settings, stage)  # its steps become the budget's number once fixed
        self.budget_pending = self.ts.time_budget_minutes > 0  # steps not fixed yet: calibrate at step 0
        self.budget_recheck: dict[str, Any] | None = None  # the plan and the steps' times, while they may refit
        self.stage_dir = self.run_dir / stage
        self.step = 0  # optimizer steps done, earlier sessions of a resumed stage included
        self.tokens = 0
        # Built by setup(), from the settings, the world size and the files of the run.
        self.plan: StagePlan | None = None
        self.tokenizer_dir: Path | None = None  # the tokenizer the model was trained with
        self.tokenizer_name: str | None = None  # how murmur.json names it
        self.dtype: torch.dtype | None = None  # of compute (autocast or FSDP's mixed precision)
        self.mesh = None  # the DeviceMesh; None for one process
        self.autocast: Any = nullcontext()
        self.model: torch.nn.Module | None = None  # wrapped for the layout (TP, FSDP2, DDP, compile); None with PP
        self.pipeline: Pipeline | None = None  # with pp > 1: this rank's stages and their schedule
        self.model_parts: list[torch.nn.Module] = []  # [model], or this rank's pipeline stages
        self.optimizers: list[torch.optim.Optimizer] = []  # of every part
        self.part_optimizers: list[list[torch.optim.Optimizer]] = []  # the optimizers of each part
        self.checkpointer: ckpt.Checkpointer | None = None
        self.dp_rank = 0  # which slice of the data this process reads
        self.loader = None  # the training TokenLoader (loops)
        self.val_loader = None  # the validation TokenLoader, None without a validation split
        self.byte_lengths: Tensor | None = None  # UTF-8 bytes per token id, on the device, for bits per byte
        self.flops_per_token = 0.0
        self.compiled = False  # whether torch.compile wraps the model

    # ---- setup

    def _init_source(self) -> Source | None:
        """For SFT: the model it starts from (murmur.source.resolve_training_start); None for pretraining."""
        if self.stage != "sft":
            return None
        if self.ts.init_from is not None:
            return resolve_training_start(self.ts.init_from, "sft.init_from")
        step_dir = ckpt.latest_step_dir(self.run_dir / "pretrain" / ckpt.CHECKPOINTS)
        if step_dir is None:
            raise MurmurError(f"SFT starts from the run's pretraining checkpoint, but {self.run_dir / 'pretrain'} "
                              "has none; run `murmur train RECIPE --stage pretrain` first, or set sft.init_from")
        return resolve_training_start(step_dir, "the run's pretraining checkpoint")

    def _model_settings(self, init: Source | None) -> ModelSettings:
        """Pretraining uses [model]; SFT the shape of whatever it starts (or resumes) from."""
        if init is None:
            return self.settings.model
        own = ckpt.latest_step_dir(self.stage_dir / ckpt.CHECKPOINTS) if self.stage_dir.is_dir() else None
        if own is not None and not self.overwrite:
            return ckpt.model_settings(own, ckpt.read_meta(own))
        return init.settings

    def _tokenizer_dir(self, init: Source | None) -> tuple[Path | None, str | None]:
        """(the tokenizer folder, how murmur.json names it: relative to the run when inside it)."""
        own = self.run_dir / "tokenizer"
        if (own / "tokenizer.json").is_file():
            return own, "tokenizer"
        if init is not None and init.tokenizer_dir is not None:
            return init.tokenizer_dir, str(init.tokenizer_dir.resolve())
        return None, None

    def setup(self) -> StagePlan:
        rt, ts = self.rt, self.ts
        init = self._init_source()
        model_settings = self._model_settings(init)
        self.plan = plan = make_plan(self.settings, self.stage, rt.world_size, model_settings)
        if not _has_split(self.run_dir, self.stage, "train"):
            raise MurmurError(f"no {self.stage} training shards in {_tokens_dir(self.run_dir) / self.stage / 'train'};"
                              " run `murmur tokenize` first (or `murmur build`)")
        _claim_stage_dir(self.stage_dir, plan, self.overwrite, rt)
        self.tokenizer_dir, self.tokenizer_name = self._tokenizer_dir(init)

        self.dtype = self._compute_dtype(rt.device)
        torch.manual_seed(ts.seed)
        self.mesh = build_mesh(plan.layout, rt.device.type)
        layout = plan.layout
        sharded = layout.sharded  # FSDP2 owns the parameters
        meta_init = (sharded or layout.tp > 1 or layout.pipelined) and count_params(model_settings) > META_INIT_PARAMS
        with torch.device("meta" if meta_init else rt.device):
            model = Transformer(model_settings)
        adapters = lora_settings(ts)
        if adapters:  # frozen before any wrapper sees the model: FSDP2 and the optimizer then skip the base
            trainable, total = apply_lora(model, adapters)
            self._say(f"lora         {adapters.describe()}: {trainable:,} of {total:,} parameters train")
        # FSDP casts parameters for compute itself; otherwise autocast does.
        param_dtype = self.dtype if (sharded and self.dtype != torch.float32) else None
        self.autocast = (torch.autocast(rt.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 and not sharded else nullcontext())

        self.compiled = self._compile_possible(rt.device)

        def parallelize_part(part: torch.nn.Module) -> torch.nn.Module:
            return parallelize(part, layout, self.mesh, compile=self.compiled,
                               activation_checkpointing=ts.activation_checkpointing,
                               reshard_after_forward=ts.parallel.reshard_after_forward, param_dtype=param_dtype,
                               device=rt.device)

        if layout.pipelined:
            # Every rank built the whole model from the same seed: each stage starts as in one process.
            self.pipeline = build_pipeline(model, layout, self.mesh, rt.device, plan.accumulation, ts.seq_len,
                                           parallelize_part)
            self.model_parts = self.pipeline.parts
            del model
        else:
            self.model = parallelize_part(model)
            self.model_parts = [self.model]
        if meta_init:
            stage_ids = self.pipeline.stage_ids if self.pipeline else [0]
            for part, stage_id in zip(self.model_parts, stage_ids):
                part.to_empty(device=rt.device)
                torch.manual_seed(ts.seed + stage_id)  # each pipeline stage draws its own weights
                getattr(part, "module", part).init_weights()  # DDP wraps; FSDP2 and TP work in place
        self.part_optimizers = [build_optimizers(part, ts, rt.device.type) for part in self.model_parts]
        self.optimizers = [opt for opts in self.part_optimizers for opt in opts]
        if meta_init and adapters:  # adapters made on the meta device hold no values since to_empty()
            reset_adapters(self.model)
        self.checkpointer = ckpt.Checkpointer(self.stage_dir, ts.keep_checkpoints,
                                              async_save=ts.async_checkpoint and rt.device.type == "cuda")
        self.checkpointer.clean_partial()

        self.dp_rank = data_rank(self.mesh, plan.layout)
        self.loader = _open_loader(self.run_dir, self.stage, "train", ts, self.dp_rank, plan.layout.dp_size, True)
        resume = self.checkpointer.latest()
        if resume is not None:
            meta, ranks = self.checkpointer.load(resume, self.model_parts, self.part_optimizers)
            self.step, self.tokens = meta["step"], meta["tokens"]
            same_world = len(ranks) == rt.world_size
            mine = ranks[rt.rank] if same_world else ranks[0]
            self.loader.load_state_dict(mine["loader"])
            if same_world:
                ckpt.set_rng_state(mine["rng"])
            self._say(f"resumed from {resume} (step {self.step}, {self.tokens:,} tokens, written by {len(ranks)} "
                      f"process{'es' if len(ranks) > 1 else ''})")
        elif init is not None:
            self._load_initial_weights(init.origin, init.step_dir or init.path)
        if self.budget_pending:
            self._resume_budget()
        byte_lengths = token_byte_lengths(_bytes_tokenizer(self.run_dir, self.tokenizer_dir), model_settings.vocab_size)
        self.byte_lengths = byte_lengths.to(rt.device) if byte_lengths is not None else None  # moved once
        self.val_loader = (_open_loader(self.run_dir, self.stage, "validation", ts, self.dp_rank,
                                        plan.layout.dp_size, False)
                           if _has_split(self.run_dir, self.stage, "validation") else None)
        self.flops_per_token = flops_per_token(model_settings, ts.seq_len)
        return plan

    # ---- the time budget (murmur/train/budget.py)

    def _set_steps(self, steps: int) -> None:
        """Fix the stage's number of steps: the schedule, the last evaluation and checkpoint follow it."""
        self.ts = self.ts.model_copy(update={"steps": steps})
        self.plan.ts = self.ts
        self.budget_pending = False

    def _resume_budget(self) -> None:
        """A stage whose budget already fixed its steps keeps them; one resumed past step 0 without a record
        (the budget was added later) keeps its configured steps, since its schedule already ran on them."""
        recorded = time_budget.read_budget(self.stage_dir)
        if recorded is not None:
            self._set_steps(int(recorded["steps"]))
            self._say(f"budget       {self.ts.steps} steps, fixed by the time budget when the stage started "
                      f"({self.stage_dir / time_budget.BUDGET_FILE})")
        elif self.step > 0:
            self.budget_pending = False
            self._say(f"warning: resumed at step {self.step} with no recorded time budget: the stage keeps "
                      f"{section_name(self.stage)}.steps={self.ts.steps}")

    def _sync_device(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)

    def _fix_steps_by_budget(self, batches: Iterator[dict[str, Tensor]], eval_seconds: float
                             ) -> Iterator[dict[str, Tensor]]:
        """Time a checkpoint and a few steps, rewind them, fix the steps that fit the budget; the batches to
        train on (from the first again).

        The rewind restores the trainable weights, the optimizers' states, the data position and the RNG,
        so the run that follows is exactly a plain run of the fixed number of steps.
        """
        ts, section = self.ts, section_name(self.stage)
        params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        saved_params = [p.detach().clone() for p in params]
        # Before the save: saving fills an empty optimizer state (DCP takes one step at lr 0).
        saved_optimizers = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        saved_loader, saved_rng = self.loader.state_dict(), ckpt.rng_state()
        mark = self.clock()
        self.save()  # a valid checkpoint of step 0; timed, since the run writes one at least at its end
        self.checkpointer.wait()
        checkpoint_seconds = self.clock() - mark
        scratch = IntervalMeter(self.rt.device)
        for _ in range(time_budget.WARMUP_STEPS):  # compilation and first allocations: not timed
            self.take_step(batches, scratch)
        self._sync_device()
        mark = self.clock()
        for _ in range(time_budget.TIMED_STEPS):
            self.take_step(batches, scratch)
        self._sync_device()
        step_seconds = (self.clock() - mark) / time_budget.TIMED_STEPS
        if self.compiled and self.val_loader is not None:
            # The first validation compiled the model's forward: time one as the later ones will run.
            mark = self.clock()
            self.evaluate()
            eval_seconds = self.clock() - mark
        with torch.no_grad():
            for param, saved in zip(params, saved_params):
                param.copy_(saved)
        for opt, state in zip(self.optimizers, saved_optimizers):
            opt.load_state_dict(state)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.loader.load_state_dict(saved_loader)
        ckpt.set_rng_state(saved_rng)
        self.step, self.tokens = 0, 0
        # Every process plans with the slowest one's times, so all fix the same number.
        times = torch.tensor([step_seconds, eval_seconds, checkpoint_seconds, self.clock() - self.started],
                             dtype=torch.float64, device=self.rt.device)
        step_s, eval_s, checkpoint_s, spent = _all_reduce(
            times, dist.ReduceOp.MAX if dist.is_initialized() else None).tolist()
        budget_s = ts.time_budget_minutes * 60
        steps = time_budget.steps_that_fit(budget_s - spent, ts.steps, step_s, eval_s, ts.eval_interval,
                                           checkpoint_s, ts.checkpoint_interval)
        if steps == 0:
            self._say(f"warning: {section}.time_budget_minutes={ts.time_budget_minutes:g} leaves no room for a step "
                      f"({spent:.0f} s spent before training, {step_s:.1f} s per step): running 1 step, over budget;"
                      f" raise the budget or lower {section}.micro_batch_size")
            steps = 1
        planned = spent + time_budget.stage_seconds(steps, step_s, eval_s, ts.eval_interval, checkpoint_s,
                                                    ts.checkpoint_interval)
        plan = time_budget.BudgetPlan(
            time_budget_minutes=ts.time_budget_minutes, steps=steps, steps_ceiling=ts.steps,
            seconds_per_step=step_s, tokens_per_sec=self.plan.tokens_per_step / step_s if step_s > 0 else 0.0,
            eval_seconds=eval_s, checkpoint_seconds=checkpoint_s, seconds_before_training=spent,
            planned_seconds=planned,
            reproduce=f"--set {section}.steps={steps} --set {section}.time_budget_minutes=0")
        self._record_budget(plan)
        self._set_steps(steps)
        self._say(f"budget       {steps} steps fit {ts.time_budget_minutes:g} min (at most {plan.steps_ceiling}): "
                  f"{step_s:.2f} s/step ({plan.tokens_per_sec:,.0f} tokens/s), validation {eval_s:.1f} s, "
                  f"checkpoint {checkpoint_s:.1f} s, {spent:.0f} s before training; planned {planned / 60:.1f} min."
                  f" Reproduce: {plan.reproduce}")
        if ts.schedule != "cosine" or ts.warmup_steps >= time_budget.RECHECK_MIN_WARMUP:
            self.budget_recheck = {"plan": plan, "seconds": 0.0, "steps": 0, "rechecked": False}
        return iter(self.loader)

    def _lr_independent_before(self, steps: int) -> int:
        ts = self.ts
        return time_budget.lr_independent_before(ts.schedule, steps, ts.warmup_steps, ts.decay_fraction)

    def _record_budget(self, plan: time_budget.BudgetPlan) -> None:
        if self.rt.is_main:
            time_budget.write_budget(self.stage_dir, plan)
        if dist.is_initialized():
            dist.barrier()

    def _recheck_budget(self, step_seconds: float) -> None:
        """Count a step's time (not the first's, after the calibration's rewind); at the end of the warmup and
        then every RECHECK_WINDOW steps while the schedule allows (murmur/train/budget.py), fix the number of
        steps again from those times, within the budget and the ceiling, and record it."""
        recheck, ts = self.budget_recheck, self.ts
        if self.step > 1:
            recheck["seconds"] += step_seconds
            recheck["steps"] += 1
        if self.step > self._lr_independent_before(ts.steps) or self.step >= ts.steps:
            # A step whose learning rate depended on the total has run: the total is fixed for good.
            self.budget_recheck = None
            return
        # The first recheck comes at the end of the warmup (all its steps but the first timed), the later ones
        # every RECHECK_WINDOW steps.
        window = time_budget.RECHECK_WINDOW if recheck["rechecked"] else min(time_budget.RECHECK_WINDOW,
                                                                             max(1, ts.warmup_steps - 1))
        if self.step < min(ts.warmup_steps, ts.steps) or recheck["steps"] < window:
            return
        recheck["rechecked"] = True
        plan = recheck["plan"]
        times = torch.tensor([recheck["seconds"] / recheck["steps"], self.clock() - self.started],
                             dtype=torch.float64, device=self.rt.device)
        step_s, spent = _all_reduce(times, dist.ReduceOp.MAX if dist.is_initialized() else None).tolist()
        recheck["seconds"], recheck["steps"] = 0.0, 0
        if ts.schedule == "cosine":
            self.budget_recheck = None  # cosine: once, at the end of the warmup
        # The steps left fit what is left of the budget; evaluations and checkpoints fall on absolute steps:
        # those of a `total`-step stage less those already behind.
        usable = (ts.time_budget_minutes * 60 - spent) * (1 - time_budget.SAFETY_MARGIN)
        done = self.step

        def cost(total: int) -> float:
            evals = time_budget.occurrences(total, ts.eval_interval) - done // ts.eval_interval
            saves = time_budget.occurrences(total, ts.checkpoint_interval) - done // ts.checkpoint_interval
            return (total - done) * step_s + evals * plan.eval_seconds + saves * plan.checkpoint_seconds

        steps = done
        for total in range(done + 1, plan.steps_ceiling + 1):  # cost() grows with total
            if cost(total) > usable:
                break
            steps = total
        # Only a total under which the steps already taken had the same learning rates keeps the run exact.
        while steps < plan.steps_ceiling and self._lr_independent_before(steps) < done:
            steps += 1
        if steps == ts.steps:
            return
        section = section_name(self.stage)
        plan = dataclasses.replace(
            plan, steps=steps, rechecked_at_step=done, steps_calibrated=plan.steps_calibrated or plan.steps,
            seconds_per_step_rechecked=step_s, rechecks=plan.rechecks + 1, planned_seconds=spent + cost(steps),
            reproduce=f"--set {section}.steps={steps} --set {section}.time_budget_minutes=0")
        if self.budget_recheck is not None:
            self.budget_recheck["plan"] = plan
        self._record_budget(plan)
        self._set_steps(steps)
        self._say(f"budget       {steps} steps after step {done}'s {step_s:.2f} s/step (calibration: "
                  f"{plan.seconds_per_step:.2f} s/step, {plan.steps_calibrated} steps). Reproduce: {plan.reproduce}")

    def _load_initial_weights(self, kind: str, path: Path) -> None:
        if kind == "checkpoint":
            for part in self.model_parts:
                ckpt.load_model_weights(part, path)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            from murmur import hf

            full, _ = hf.load_hf_model(path, device="cpu", dtype=torch.float32)
            weights = full.state_dict()
            for part in self.model_parts:  # a pipeline stage takes the weights it has names for
                set_model_state_dict(part, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        self._say(f"starting from {kind} {path}")

    def _compile_possible(self, device: torch.device) -> bool:
        """train.compile, unless torch.compile cannot build CPU kernels here (then a warning says why)."""
        why = accel.cpu_compile_unavailable() if self.ts.compile and device.type == "cpu" else None
        if why:
            self._say(f"warning: compile is off: {why}")
        return self.ts.compile and why is None

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The stage's dtype setting; bf16 on a CPU that would only emulate it becomes float32, with a warning.

        bf16 on CPU is asked for speed (the demo recipe does); emulated it is slower than float32, and
        float32 loses nothing in quality, so falling back keeps the intent.
        """
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[self.ts.dtype]
        if device.type == "cpu" and dtype == torch.bfloat16 and not accel.cpu_bf16_fast():
            self._say("warning: this CPU has no native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is slower "
                      "than float32: training in float32 instead")
            return torch.float32
        return dtype

    def _say(self, text: str) -> None:
        if self.rt.is_main:
            print(text, flush=True)

    # ---- one optimizer step

    def _loss_sum(self, inputs: Tensor, targets: Tensor) -> Tensor:
        with self.autocast:
            logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum")

    def _sync_context(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.plan.accumulation == 1:
            return nullcontext()
        if self.plan.layout.sharded:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        if hasattr(self.model, "no_sync") and not last:
            return self.model.no_sync()
        return nullcontext()

    def train_step(self, batches: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, int | Tensor]:
        """Forward/backward over the step's micro-batches, clip, and step: (loss sum, grad norm, target count).

        Each micro-batch's summed loss is divided by the global number of target tokens (times the
        data-parallel size, which the gradient averaging divides by again), so the update is the
        gradient of the mean loss over the whole global batch. With several processes the global count
        stays a device tensor, so the step never waits for the host (it is read at log intervals).
        """
        device, layout = self.rt.device, self.plan.layout
        count = sum(int((b["targets"] != IGNORE).sum()) for b in batches)  # the loader's CPU tensors: no sync
        global_count: int | Tensor = count
        if layout.dp_size > 1:
            # Summed over every process, of which the tensor- and pipeline-parallel ranks of a data slice
            # hold the same batches.
            total = _all_reduce(torch.tensor(count, dtype=torch.int64, device=device))
            global_count = total // layout.model_parallel
            scale = layout.dp_size / global_count.clamp_min(1)
        else:
            scale = layout.dp_size / max(count, 1)
        if self.pipeline is not None:
            inputs = torch.cat([b["inputs"] for b in batches]).to(device, non_blocking=True)
            targets = torch.cat([b["targets"] for b in batches]).to(device, non_blocking=True)
            with self.autocast:
                total = self.pipeline.step(inputs, targets, scale)
            return total, self._clip_gradients(), global_count
        total = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            inputs = batch["inputs"].to(device, non_blocking=True)
            targets = batch["targets"].to(device, non_blocking=True)
            with self._sync_context(i == len(batches) - 1):
                loss_sum = self._loss_sum(inputs, targets)
                (loss_sum * scale).backward()
            total += loss_sum.detach()
        grad_norm = self._clip_gradients()
        return total, grad_norm, global_count

    def _clip_gradients(self) -> Tensor:
        """Total gradient norm over every parameter (clipped to grad_clip when set)."""
        params = [p for part in self.model_parts for p in part.parameters() if p.grad is not None]
        max_norm = self.ts.grad_clip or float("inf")
        from torch.distributed.tensor import DTensor

        meshes = {p.grad.device_mesh if isinstance(p.grad, DTensor) else None for p in params}
        if len(meshes) == 1 and self.pipeline is None:  # one process, DDP, or FSDP without TP: in one go
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm
        # With TP some parameters live on the dp × tp mesh, others on dp only (or nowhere); with PP each
        # rank holds some stages: sum the squares per mesh, then over the pipeline, then scale each group
        # (one host sync; only in these layouts).
        groups: dict[Any, list[Tensor]] = {}
        for p in params:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
        total_sq = torch.zeros((), device=self.rt.device)
        for grads in groups.values():
            norm = torch.nn.utils.get_total_norm(grads, foreach=False)
            total_sq += (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
        if self.pipeline is not None:
            dist.all_reduce(total_sq, group=self.pipeline.group)
        total = total_sq.sqrt()
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for grads in groups.values():
                for g in grads:
                    g.mul_(coef)
        return total

    def _optimizer_step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Validation loss (nats/token) and bits per byte over up to eval_batches batches per process.

        Processes may hold different numbers of validation batches (one may have none): all run the
        largest count, padding with batches that take no loss, so sharded forwards never wait forever.
        """
        ts, device = self.ts, self.rt.device
        loader = self.val_loader
        if loader is None:
            return {"val_loss": None, "val_bpb": None}
        loader.load_state_dict({"position": 0})  # the same first batches every time
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= ts.eval_batches:
                break
        n = int(_all_reduce(torch.tensor([len(batches)], device=device), dist.ReduceOp.MAX if dist.is_initialized()
                            else None)[0])
        if n == 0:
            return {"val_loss": None, "val_bpb": None}
        blank = {"inputs": torch.zeros(ts.micro_batch_size, ts.seq_len, dtype=torch.long),
                 "targets": torch.full((ts.micro_batch_size, ts.seq_len), IGNORE, dtype=torch.long)}
        batches += [blank] * (n - len(batches))
        if self.pipeline is not None:  # the schedule runs its number of equal micro-batches at a time
            group = self.pipeline.microbatches
            batches = [_pad_rows(b, blank) for b in batches] + [blank] * (-len(batches) % group)
            batches = [{key: torch.cat([b[key] for b in batches[i:i + group]]) for key in ("inputs", "targets")}
                       for i in range(0, len(batches), group)]
        for part in self.model_parts:
            part.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
        # With a pipeline only the last stage's ranks see the loss: only they count tokens and bytes.
        counts = self.pipeline is None or self.pipeline.has_last
        for batch in batches:
            inputs, targets = batch["inputs"].to(device), batch["targets"].to(device)
            if self.pipeline is not None:
                with self.autocast:
                    sums[0] += self.pipeline.evaluate(inputs, targets).double()
            else:
                sums[0] += self._loss_sum(inputs, targets).double()
            if counts:
                valid = targets != IGNORE
                sums[1] += valid.sum()
                if self.byte_lengths is not None:
                    sums[2] += self.byte_lengths[targets.clamp(min=0)][valid].sum()
        for part in self.model_parts:
            part.train()
        loss, count, nbytes = _all_reduce(sums).tolist()
        if count == 0:
            return {"val_loss": None, "val_bpb": None}
        bpb = loss / math.log(2) / nbytes if nbytes > 0 else None
        return {"val_loss": loss / count, "val_bpb": bpb}

    # ---- when things are due (after `step` optimizer steps)

    def should_log(self, step: int) -> bool:
        """A metrics record every log_interval steps and at the last step."""
        return step % self.ts.log_interval == 0 or step == self.ts.steps

    def should_evaluate(self, step: int) -> bool:
        """Validation every eval_interval steps and at the last step (and before the first: see `train`)."""
        return step % self.ts.eval_interval == 0 or step == self.ts.steps

    def should_checkpoint(self, step: int) -> bool:
        """A checkpoint every checkpoint_interval steps and at the last step."""
        return step % self.ts.checkpoint_interval == 0 or step == self.ts.steps

    # ---- the loop

    def _meta(self) -> dict[str, Any]:
        return {"format": 1, "stage": self.stage, "step": self.step, "tokens": self.tokens,
                "model": self.plan.model.model_dump(mode="json"), "tokenizer_dir": self.tokenizer_name,
                "world_size": self.rt.world_size, "layout": self.plan.layout.describe(),
                "train": self.ts.model_dump(mode="json")}

    def save(self) -> Path:
        local = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
        return self.checkpointer.save(self.step, self.model_parts, self.part_optimizers, self._meta(), local)

    @property
    def checks_every_step(self) -> bool:
        """Whether each step's loss is checked for NaN at once: free on CPU; on GPU a host sync that only
        nan_policy="skip" pays for (otherwise a NaN is caught at the next log interval)."""
        return self.rt.device.type == "cpu" or self.ts.nan_policy == "skip"

    def _nonfinite(self, loss_sum: Tensor, grad_norm: Tensor) -> bool:
        return not bool(torch.isfinite(loss_sum + grad_norm))

    def _stop_for_nan(self, step: int) -> None:
        last = self.checkpointer.latest()
        where = f"the last good checkpoint is {last}" if last else "there is no checkpoint yet"
        raise MurmurError(f"loss or gradient became NaN/infinite at step {step}; {where}. Lower the learning rate "
                          f"({section_name(self.stage)}.lr), check the data, or set "
                          "nan_policy=\"skip\" to skip such steps")

    def take_step(self, batches: Iterator[dict[str, Tensor]], meter: IntervalMeter) -> None:
        """One optimizer step: set the learning rate, train on the step's micro-batches, update (or skip)."""
        ts, plan = self.ts, self.plan
        set_learning_rate(self.optimizers, lr_multiplier(self.step, ts))
        loss_sum, grad_norm, count = self.train_step([next(batches) for _ in range(plan.accumulation)])
        if self.checks_every_step and self._nonfinite(loss_sum, grad_norm):
            if ts.nan_policy == "stop":
                self._stop_for_nan(self.step + 1)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self._say(f"step {self.step + 1}: non-finite loss or gradient, step skipped (nan_policy=skip)")
            meter.count_step(plan.tokens_per_step, grad_norm)
        else:
            self._optimizer_step()
            meter.count_step(plan.tokens_per_step, grad_norm, loss_sum, count)
        self.step += 1
        self.tokens += plan.tokens_per_step

    def _log_interval(self, meter: IntervalMeter, logger: MetricsLogger) -> None:
        """The training record of the interval that ends at this step (its values leave the device here)."""
        interval = meter.close(reduce=_all_reduce)
        # The targets are already global (train_step counts over all processes); the loss sum counts
        # each data slice's batches once per tensor- and pipeline-parallel rank of the slice.
        loss = (interval.loss_sum / self.plan.layout.model_parallel / interval.targets if interval.targets
                else None)
        if loss is not None and not math.isfinite(loss) and not self.checks_every_step:
            self._stop_for_nan(self.step)
        record = {"step": self.step, "tokens": self.tokens, "loss": loss,  # loss None: every step skipped
                  "lr": self.optimizers[-1].param_groups[0]["lr"], "grad_norm": interval.grad_norm,
                  **logger.rates(interval.tokens, interval.seconds)}
        if self.rt.device.type == "cuda":
            record["memory_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        if interval.skipped_steps:
            record["skipped_steps"] = interval.skipped_steps
        logger.log(record)

    def _evaluate_and_log(self, logger: MetricsLogger) -> dict[str, float | None]:
        result = self.evaluate()
        if result["val_loss"] is not None:
            logger.log({"step": self.step, "tokens": self.tokens, **result})
        return result

    def train(self) -> dict[str, Any]:
        """Train the stage's remaining steps; a summary of the run (steps, tokens, last validation, checkpoint)."""
        rt = self.rt
        logger = MetricsLogger(self.stage_dir, self.ts.steps, self.flops_per_token, rt.device, rt.world_size,
                               enabled=rt.is_main, loggers=self.ts.loggers, config=self.ts.model_dump(mode="json"))
        for line in self.plan.describe():
            self._say(line)
        self._say(peak_flops_note(rt.device))
        meter = IntervalMeter(rt.device)  # evaluation and checkpoints run paused: tokens/s is training's
        batches = iter(self.loader)
        start_step = self.step
        last_val: dict[str, Any] = {}
        for part in self.model_parts:
            part.train()
        try:
            if self.step == 0:  # where a fresh stage starts from: for SFT, the pretrained model's loss
                with meter.paused():
                    mark = self.clock()
                    last_val = self._evaluate_and_log(logger)
                    if self.budget_pending:
                        batches = self._fix_steps_by_budget(batches, self.clock() - mark)
                        logger.total_steps = self.ts.steps
            while self.step < self.ts.steps:
                mark = self.clock()
                self.take_step(batches, meter)
                if self.budget_recheck is not None:
                    self._sync_device()
                    self._recheck_budget(self.clock() - mark)
                    logger.total_steps = self.ts.steps
                if self.should_log(self.step):
                    self._log_interval(meter, logger)
                if self.should_evaluate(self.step):
                    with meter.paused():
                        last_val = self._evaluate_and_log(logger)
                if self.should_checkpoint(self.step):
                    with meter.paused():
                        self.save()
            self.checkpointer.wait()
        except torch.OutOfMemoryError:
            section = section_name(self.stage)
            raise MurmurError(f"out of GPU memory at step {self.step + 1}; lower {section}.micro_batch_size (keep "
                              f"global_batch_tokens to accumulate instead), set {section}.activation_checkpointing="
                              f"\"full\", shard more ({section}.parallel.dp_shard, tp) or lower {section}.seq_len"
                              ) from None
        finally:
            logger.close()
        return {"stage": self.stage, "steps": self.step, "tokens": self.tokens, "new_steps": self.step - start_step,
                "checkpoint": str(self.checkpointer.latest()),
                **({"time_budget_minutes": self.ts.time_budget_minutes} if self.ts.time_budget_minutes else {}),
                **last_val}


def run_stage(settings, run_dir: str | Path, stage: str = "pretrain", *, overwrite: bool = False) -> dict[str, Any]:
    """Train one stage (pretrain or sft) in this process, resuming from the stage's latest checkpoint.

    Returns a summary: steps, tokens, final validation loss and the checkpoint written.
    """
    rt = start_runtime(training_settings(settings, stage))
    try:
        trainer = Trainer(settings, Path(run_dir), stage, rt, overwrite=overwrite)
        trainer.setup()
        return trainer.train()
    finally:
        if rt.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
