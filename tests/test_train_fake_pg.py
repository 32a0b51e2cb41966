"""Scale without the fleet: the 8b preset's FSDP × TP sharding for 1,024 ranks, built in one process.

A fake process group answers every collective without communicating, so the mesh and the sharded
(meta-device) model of rank 0 of a 1,024-GPU job can be constructed and inspected here.
"""

import subprocess
import sys
import textwrap


def test_8b_fsdp_tp_layout_for_1024_ranks_constructs():
    # In a child process: a fake process group is global state that must not leak into other tests.
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from murmur.model import Transformer, count_params
        from murmur.settings.model import ModelSettings
        from murmur.settings.train import ParallelSettings
        from murmur.train.parallel import build_mesh, parallelize, resolve_layout, data_rank

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1024)
        layout = resolve_layout(ParallelSettings(tp=8, dp_shard=-1), 1024)
        assert (layout.dp_replicate, layout.dp_shard, layout.tp) == (1, 128, 8), layout
        mesh = build_mesh(layout, "cpu")
        assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "tp") and mesh.size() == 1024
        settings = ModelSettings(preset="8b")
        with torch.device("meta"):
            model = Transformer(settings)
        model = parallelize(model, layout, mesh, activation_checkpointing="full", param_dtype=torch.bfloat16)
        q = model.layers[0]._checkpoint_wrapped_module.self_attn.q_proj.weight
        assert isinstance(q, DTensor) and q.device_mesh.ndim == 2, q
        assert all(getattr(p, "dim", None) == 0 for p in q.placements), q.placements  # FSDP on top of TP: strided
        assert tuple(q.to_local().shape) == (4096 // 8 // 128, 4096), q.to_local().shape
        down = model.layers[0]._checkpoint_wrapped_module.mlp.down_proj.weight
        assert tuple(down.to_local().shape) == (4096 // 128, 14336 // 8), down.to_local().shape
        attn = model.layers[0]._checkpoint_wrapped_module.self_attn
        assert (attn.n_heads, attn.n_kv_heads) == (32 // 8, 8 // 8)
        emb = model.embed_tokens.weight
        assert isinstance(emb, DTensor) and tuple(emb.to_local().shape) == (-(-128256 // 128), 4096), emb.to_local().shape
        local = sum(p.to_local().numel() for p in model.parameters())
        total = count_params(settings)
        assert total / 1024 * 0.9 < local < total / 128 * 1.1, (local, total)
        assert data_rank(mesh, layout) == 0
        print("OK", local, total)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
