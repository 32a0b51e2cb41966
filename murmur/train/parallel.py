"""How the model is spread over processes: the named DeviceMesh and the one `parallelize` step.

The mesh has four named dimensions in torchtitan's order: `pp` × `dp_replicate` × `dp_shard` × `tp`
= world size (pipeline outermost, across nodes; tensor parallel innermost, within a node).
`parallelize` wraps a plain `Transformer`, or one pipeline stage of it (murmur/train/pipeline.py cuts
the stages), from outside, always in the same order: tensor parallel, then activation checkpointing,
then `torch.compile`, then data parallel (FSDP2 `fully_shard` per block and at the root, HSDP when
dp_replicate > 1 too, or DDP when nothing is sharded). The model code knows nothing of any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from murmur.errors import MurmurError
from murmur.settings.train import ParallelSettings

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """The resolved parallel degrees of a run. Their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int = 1
    pp_schedule: str = "1F1B"  # a torch.distributed.pipelining schedule (ParallelSettings.pp_schedule)
    virtual_stages: int = 1  # pipeline stages per pp rank

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    @property
    def stages(self) -> int:
        """Pipeline stages in all (1 without a pipeline)."""
        return self.pp * self.virtual_stages if self.pipelined else 1

    @property
    def model_parallel(self) -> int:
        """Processes that read the same batches: the tensor- and pipeline-parallel ranks of one data slice."""
        return self.tp * self.pp

    @property
    def dp_size(self) -> int:
        """Processes that see different data (TP ranks of one group see the same batches)."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 owns the parameters (FSDP, or HSDP when dp_replicate > 1 too).

        TP or PP with replicas is sharded as well (HSDP, possibly with one shard): DDP cannot wrap the
        DTensors tensor parallel makes, and its reducer fails under a pipeline schedule in torch 2.13.
        """
        return self.dp_shard > 1 or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    @property
    def replicated(self) -> bool:
        """Whether several groups hold whole copies of the (possibly sharded) model: DDP, or HSDP's outer dim."""
        return self.dp_replicate > 1

    @property
    def strategy(self) -> str:
        """A short name for the data-parallel scheme, for people: single, ddp, fsdp or hsdp (+tpN when used)."""
        if self.sharded:
            name = "hsdp" if self.replicated else "fsdp"
        else:
            name = "ddp" if self.replicated else "single"
        name = f"{name}+tp{self.tp}" if self.tp > 1 else name
        if self.pipelined:
            name += f"+pp{self.pp}" + (f"v{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return name

    def describe(self) -> str:
        pipeline = (f"pp {self.pp} ({self.pp_schedule}, {self.stages} stages) × " if self.pipelined else "")
        return (f"{self.strategy}: {pipeline}dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × tp "
                f"{self.tp} = {self.world_size} process{'es' if self.world_size > 1 else ''}")


def resolve_layout(parallel: ParallelSettings, world_size: int) -> Layout:
    """The degrees for `world_size` processes, with dp_shard=-1 filled in; an error if they do not multiply out."""
    fixed = parallel.pp * parallel.dp_replicate * parallel.tp
    if parallel.dp_shard == -1:
        if world_size % fixed:
            raise MurmurError(f"world size {world_size} is not divisible by train.parallel.pp × dp_replicate × tp = "
                              f"{parallel.pp} × {parallel.dp_replicate} × {parallel.tp}; change them or the number "
                              "of processes")
        shard = world_size // fixed
    else:
        shard = parallel.dp_shard
    layout = Layout(parallel.dp_replicate, shard, parallel.tp, parallel.pp, parallel.pp_schedule,
                    parallel.virtual_stages)
    if layout.world_size != world_size:
        raise MurmurError(f"train.parallel degrees multiply to {layout.world_size} (pp {layout.pp} × dp_replicate "
                          f"{layout.dp_replicate} × dp_shard {layout.dp_shard} × tp {layout.tp}) but {world_size} "
                          "processes were launched; set train.parallel.dp_shard=-1 or launch that many processes")
    if not layout.pipelined and (parallel.virtual_stages != 1 or parallel.pp_schedule != "1F1B"):
        raise MurmurError("train.parallel.pp_schedule and virtual_stages apply to a pipeline; set "
                          "train.parallel.pp > 1 or leave them at their defaults (1F1B, 1)")
    return layout


def check_model_fits_layout(layout: Layout, n_heads: int, n_kv_heads: int, hidden_dim: int) -> None:
    """Tensor parallel splits heads and the MLP width: they must divide by tp."""
    if layout.tp == 1:
        return
    for name, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("ffn width", hidden_dim)):
        if value % layout.tp:
            raise MurmurError(f"train.parallel.tp={layout.tp} does not divide the model's {name} ({value}); "
                              "pick a tp that divides the number of heads, kv heads and the MLP width")


def build_mesh(layout: Layout, device_type: str):
    """The named 4-D DeviceMesh (pp, dp_replicate, dp_shard, tp); None for a single process."""
    if layout.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def data_rank(mesh, layout: Layout) -> int:
    """Which slice of the data this process reads: its position among the dp_replicate × dp_shard groups."""
    if mesh is None:
        return 0
    return mesh.get_local_rank("dp_replicate") * layout.dp_shard + mesh.get_local_rank("dp_shard")


def named_blocks(model: nn.Module) -> list[tuple[int | str, nn.Module]]:
    """(key, block) in order, for `model.layers` as a ModuleList or as a pipeline stage's ModuleDict."""
    layers = model.layers
    return list(layers.items()) if isinstance(layers, nn.ModuleDict) else list(enumerate(layers))


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP in each block: q/k/v and gate/up split by columns, o/down by rows.

    Each attention module then holds n_heads / tp heads, so its head counts are set to the local ones.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }
    for _, block in named_blocks(model):
        parallelize_module(block, tp_mesh, plan)
        block.self_attn.n_heads //= tp
        block.self_attn.n_kv_heads //= tp


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in named_blocks(model):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: smaller graphs, and FSDP hooks stay between them."""
    for _, block in named_blocks(model):
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, dp_mesh, reshard_after_forward: bool, param_dtype: torch.dtype | None) -> None:
    """FSDP2: one `fully_shard` per block, then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = named_blocks(model)
    last = len(blocks) - 1
    for i, (_, block) in enumerate(blocks):
        # The last block's parameters are needed again at once in backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(model: nn.Module, layout: Layout, mesh, *, compile: bool = False, activation_checkpointing: str = "none",
                reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> nn.Module:
    """Apply TP, then activation checkpointing, then compile, then FSDP/HSDP/DDP. Returns the model to train."""
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing == "full":
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if layout.sharded:
        dp_mesh = mesh[("dp_replicate", "dp_shard")] if layout.replicated else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, reshard_after_forward, param_dtype)
    elif layout.replicated:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device is not None and device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, process_group=mesh["dp_replicate"].get_group())
    return model
