"""Pipeline parallelism in one process: where the blocks go, the stage modules, and what the settings refuse."""

from __future__ import annotations

import pytest
import torch

from train_helpers import recipe

from murmur.config import settings_from_dict
from murmur.errors import MurmurError
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.settings.train import ParallelSettings
from murmur.train.parallel import resolve_layout
from murmur.train.pipeline import build_stage_module, split_layers, stage_ids
from murmur.train.trainer import make_plan


def _settings(n_layers=8, vocab=64, tie=False, **model) -> ModelSettings:
    return ModelSettings(vocab_size=vocab, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=32, tie_embeddings=tie, **model)


def test_blocks_are_split_evenly_and_a_costly_head_gets_fewer():
    assert [len(r) for r in split_layers(_settings(8), 4)] == [2, 2, 2, 2]
    assert [list(r) for r in split_layers(_settings(7), 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    # A head of 6 x 4096 x 32 FLOPs per token costs about ten blocks here: the last stage keeps one block.
    heavy = split_layers(_settings(12, vocab=4096), 4)
    assert [len(r) for r in heavy][-1] == 1 and sum(len(r) for r in heavy) == 12
    assert [r.start for r in heavy] == sorted(r.start for r in heavy)  # contiguous and in order
    with pytest.raises(MurmurError, match="needs at least 9 blocks"):
        split_layers(_settings(8), 9)
    assert stage_ids(1, 4, 2) == [1, 5]  # interleaved: stage s on rank s mod pp


def test_stage_modules_keep_the_whole_models_names_and_compute_its_forward():
    torch.manual_seed(0)
    model = Transformer(_settings(4)).eval()
    ranges = split_layers(model.settings, 3)
    parts = [build_stage_module(model, r, i == 0, i == 2).eval() for i, r in enumerate(ranges)]
    names = [set(p.state_dict()) for p in parts]
    assert set().union(*names) == set(model.state_dict())
    assert sum(len(n) for n in names) == len(model.state_dict())  # each parameter on one stage only
    assert "embed_tokens.weight" in names[0] and "lm_head.weight" in names[2]
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        hidden = tokens
        for part in parts:
            hidden = part(hidden)
        assert torch.equal(hidden, model(tokens))


def _plan(world, **parallel):
    data = recipe("/tmp/unused", global_batch_tokens=16 * 2 * 4, micro_batch_size=2, **{"parallel": parallel})
    data["model"].update(n_layers=4, tie_embeddings=False)
    return make_plan(settings_from_dict(data), "pretrain", world)


@pytest.mark.parametrize("world,parallel,model,train,message", [
    (2, {"pp": 2, "dp_shard": 1}, {"tie_embeddings": True}, {}, "model.tie_embeddings=false"),
    (2, {"pp": 2, "dp_shard": 1}, {}, {"global_batch_tokens": 0}, "set train.global_batch_tokens"),
    (4, {"pp": 4, "dp_shard": 1}, {}, {"global_batch_tokens": 16 * 2 * 2}, "needs at least 4 micro-batches"),
    (2, {"pp": 2, "dp_shard": 1, "virtual_stages": 2}, {}, {}, "runs one stage per rank"),
    (4, {"pp": 2, "dp_shard": 2, "pp_schedule": "InterleavedZeroBubble", "virtual_stages": 2}, {}, {},
     "computes wrong gradients"),
    (4, {"pp": 4, "dp_shard": 1, "pp_schedule": "Interleaved1F1B", "virtual_stages": 2}, {}, {},
     "needs at least 8 blocks"),
    (2, {"dp_shard": 2, "pp_schedule": "Interleaved1F1B"}, {}, {}, "apply to a pipeline"),
    (6, {"pp": 4}, {}, {}, "not divisible by train.parallel.pp"),
])
def test_pipeline_settings_that_cannot_run_are_refused(world, parallel, model, train, message):
    data = recipe("/tmp/unused", global_batch_tokens=16 * 2 * 4, micro_batch_size=2, parallel=parallel)
    data["model"].update({"n_layers": 4, "tie_embeddings": False, **model})
    data["train"].update(train)
    with pytest.raises(MurmurError, match=message):
        make_plan(settings_from_dict(data), "pretrain", world)


def test_pipeline_layouts_that_run():
    plan = _plan(8, pp=2, tp=2)
    layout = plan.layout
    assert (layout.pp, layout.dp_shard, layout.tp, layout.world_size, layout.model_parallel) == (2, 2, 2, 8, 4)
    assert plan.accumulation == 2 and plan.tokens_per_step == 16 * 2 * 4
    assert "pp 2 (1F1B, 2 stages)" in layout.describe()
    interleaved = _plan(2, pp=2, dp_shard=1, pp_schedule="Interleaved1F1B", virtual_stages=2).layout
    assert interleaved.stages == 4 and interleaved.strategy == "single+pp2v2"
    assert resolve_layout(ParallelSettings(pp=4, tp=2), 64).dp_shard == 8
