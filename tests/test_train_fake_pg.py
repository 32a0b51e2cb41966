"""Scale without the fleet: the 8b preset's sharding for 1,024 ranks (FSDP × TP) and the shipped
multi-node recipe's HSDP layout for 256 ranks, each built in one process.

A fake process group answers every collective without communicating, so the mesh and the sharded
(meta-device) model of rank 0 of a large job can be constructed and inspected here.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "8b-multinode.toml"

SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from murmur.config import load_settings
    from murmur.model import Transformer, count_params
    from murmur.settings.model import ModelSettings
    from murmur.settings.train import ParallelSettings
    from murmur.train.parallel import build_mesh, parallelize, resolve_layout, data_rank
    from murmur.train.trainer import make_plan

    def sharded_8b(parallel, world, **kwargs):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        layout = resolve_layout(parallel, world)
        mesh = build_mesh(layout, "cpu")
        assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "tp") and mesh.size() == world
        with torch.device("meta"):
            model = Transformer(ModelSettings(preset="8b"))
        model = parallelize(model, layout, mesh, param_dtype=torch.bfloat16, **kwargs)
        return layout, mesh, model

    def local_numel(model):
        return sum(p.to_local().numel() for p in model.parameters())

    total = count_params(ModelSettings(preset="8b"))

    # 1. FSDP x TP over 1,024 ranks: 128 shards x 8-way tensor parallel, activation checkpointing.
    layout, mesh, model = sharded_8b(ParallelSettings(tp=8, dp_shard=-1), 1024, activation_checkpointing="full")
    assert (layout.dp_replicate, layout.dp_shard, layout.tp) == (1, 128, 8), layout
    assert layout.sharded and not layout.replicated and layout.strategy == "fsdp+tp8", layout
    block = model.layers[0]._checkpoint_wrapped_module
    q = block.self_attn.q_proj.weight
    assert isinstance(q, DTensor) and q.device_mesh.ndim == 2, q
    assert all(getattr(p, "dim", None) == 0 for p in q.placements), q.placements  # FSDP over TP: strided
    assert tuple(q.to_local().shape) == (4096 // 8 // 128, 4096), q.to_local().shape
    assert tuple(block.mlp.down_proj.weight.to_local().shape) == (4096 // 128, 14336 // 8)
    assert (block.self_attn.n_heads, block.self_attn.n_kv_heads) == (32 // 8, 8 // 8)
    emb = model.embed_tokens.weight
    assert isinstance(emb, DTensor) and tuple(emb.to_local().shape) == (-(-128256 // 128), 4096)
    assert total / 1024 * 0.9 < local_numel(model) < total / 128 * 1.1, (local_numel(model), total)
    assert data_rank(mesh, layout) == 0
    dist.destroy_process_group()

    # 2. The shipped recipe (from `murmur plan`): HSDP, 32 replicas x 8 shards = 256 ranks.
    settings = load_settings(sys.argv[1])
    plan = make_plan(settings, "pretrain", 256)
    assert plan.layout.strategy == "hsdp" and plan.layout.sharded and plan.layout.replicated, plan.layout
    assert plan.accumulation == 2, plan.accumulation
    layout, mesh, model = sharded_8b(settings.train.parallel, 256, compile=False)
    q = model.layers[0].self_attn.q_proj.weight
    assert q.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard"), q.device_mesh
    assert [type(p).__name__ for p in q.placements] == ["Replicate", "Shard"], q.placements
    assert tuple(q.to_local().shape) == (4096 // 8, 4096)
    assert abs(local_numel(model) - total / 8) / (total / 8) < 0.01
    print("OK")
""")


def test_8b_layouts_for_large_fleets_construct():
    # In a child process: a fake process group is global state that must not leak into other tests.
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(RECIPE)], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


PIPELINE_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from murmur.config import load_settings
    from murmur.model import Transformer
    from murmur.train.parallel import build_mesh, parallelize
    from murmur.train.pipeline import build_pipeline
    from murmur.train.trainer import make_plan

    # The last of 16,384 ranks: pipeline rank 1 of 2, the last stage among its eight.
    settings = load_settings(sys.argv[1])
    plan = make_plan(settings, "pretrain", 16384)
    layout = plan.layout
    assert (layout.pp, layout.virtual_stages, layout.pp_schedule, layout.tp) == (2, 8, "Interleaved1F1B", 8), layout
    dist.init_process_group("fake", store=FakeStore(), rank=16383, world_size=16384)
    mesh = build_mesh(layout, "cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "tp") and mesh.get_local_rank("pp") == 1
    with torch.device("meta"):
        model = Transformer(settings.model)
    pipe = build_pipeline(model, layout, mesh, torch.device("cpu"), plan.accumulation, settings.train.seq_len,
                          lambda part: parallelize(part, layout, mesh, activation_checkpointing="full",
                                                   param_dtype=torch.bfloat16))
    assert pipe.stage_ids == list(range(1, 16, 2)) and pipe.has_last and not pipe.has_first
    blocks = [int(name) for part in pipe.parts for name in part.layers]
    assert len(blocks) == 63 and max(blocks) == 125, blocks  # half of the 126 blocks, the whole model's names
    assert pipe.parts[-1].lm_head is not None and all(p.embed_tokens is None for p in pipe.parts)
    q = pipe.parts[0].layers[str(blocks[0])]._checkpoint_wrapped_module.self_attn.q_proj.weight
    assert isinstance(q, DTensor) and q.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "tp")
    assert tuple(q.to_local().shape) == (16384 // 8 // 32, 16384), q.to_local().shape
    print("OK")
""")


def test_405b_pipeline_layout_the_planner_picks_for_16k_gpus_constructs(tmp_path):
    """Llama 3's batch on 16,384 H100s: the planner's fastest layout is PP 2 × 8 interleaved stages × HSDP 32×32
    × TP 8; rank 16,383's eight stages are built, tensor-parallel and sharded, on a fake process group."""
    from murmur.plan.launch import write_launch_files
    from murmur.plan.planner import PlanRequest, make_plan
    from murmur.settings.model import ModelSettings

    plan = make_plan(PlanRequest(gpu="h100", gpus=16384, model=ModelSettings(preset="405b"),
                                 global_batch_tokens=16 * 2**20))
    recipe = write_launch_files(plan, tmp_path)["recipe"]
    out = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(recipe)], capture_output=True, text=True,
                         timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
