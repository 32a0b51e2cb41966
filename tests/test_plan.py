"""The fleet planner against published runs, and its parts on their own."""

from __future__ import annotations

import math

import pytest

from murmur.errors import MurmurError
from murmur.model import count_params
from murmur.plan import schedule as sched
from murmur.plan.gpus import GPUS, get_gpu
from murmur.plan.memory import GiB, Layout, ModelFacts, RUNTIME_RESERVE_BYTES, estimate_memory
from murmur.plan.planner import PlanRequest, make_plan
from murmur.plan.search import CostModel, NoLayoutError, search
from murmur.plan.shapes import shape_for_params
from murmur.settings.model import ModelSettings

H100 = get_gpu("h100-sxm")


def _allocator_gib(mem) -> float:
    """What torch.cuda reports as reserved: everything but the CUDA context and NCCL buffers."""
    return (mem.total - RUNTIME_RESERVE_BYTES) / GiB


def test_8b_full_sharding_on_8_gpus_matches_torchtitan():
    """Llama 3.1 8B, FSDP over 8 H100s, against torchtitan's published peak memory.

    Source: pytorch/torchtitan, benchmarks/llama3_h100_202412_torchtitan.md (2024-12), seq_len 8192:
    Table 2, "FSDP 8, CP 1", local batch 1 of 32,768 tokens, full activation checkpointing: 83.9 GiB.
    Table 1 (8 GPUs) vs Table 3 (128 GPUs), local batch 2, same activations: 82.4 vs 67.0 GiB, so sharding
    the model states 16 times finer saves 15.4 GiB.
    Tolerances: 15% on the absolute figure (torchtitan ran compile + Float8 there), 10% on the difference.
    """
    model = ModelSettings(preset="8b")
    long = ModelFacts(model, 32768)
    full = estimate_memory(long, Layout(1, 8, 1, 1, 1, "full"))
    assert _allocator_gib(full) == pytest.approx(83.9, rel=0.15)

    facts = ModelFacts(model, 8192)
    on_8 = estimate_memory(facts, Layout(1, 8, 1, 1, 2, "none"))
    on_128 = estimate_memory(facts, Layout(1, 128, 1, 1, 2, "none"))
    assert (on_8.total - on_128.total) / GiB == pytest.approx(82.4 - 67.0, rel=0.10)
    # The states alone: 16 bytes x 8.03B parameters / 8 GPUs.
    assert (on_8.params + on_8.grads + on_8.optimizer) == pytest.approx(16 * count_params(model) / 8)


def test_memory_shrinks_with_sharding_checkpointing_and_tp():
    facts = ModelFacts(ModelSettings(preset="70b"), 8192)
    base = estimate_memory(facts, Layout(1, 8, 1, 1, 1, "none")).total
    assert estimate_memory(facts, Layout(1, 64, 1, 1, 1, "none")).total < base
    assert estimate_memory(facts, Layout(1, 8, 1, 1, 1, "full")).total < base
    assert estimate_memory(facts, Layout(1, 8, 8, 1, 1, "none")).total < base
    assert estimate_memory(facts, Layout(1, 8, 1, 1, 2, "none")).total > base
    # HSDP replicas do not divide the states; keeping gathered parameters costs memory.
    assert estimate_memory(facts, Layout(8, 8, 1, 1, 1, "none")).total == pytest.approx(base)
    assert estimate_memory(facts, Layout(1, 8, 1, 1, 1, "none", reshard_after_forward=False)).total > base


def test_llama3_405b_published_run():
    """Llama 3 405B: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv 2407.21783.

    - 3.8e25 FLOPs on 15.6T tokens (sections 1 and 3.2.1);
    - Table 4: 16,384 H100s as TP 8 x PP 16 x DP 128, 16M-token batches of 8,192-token sequences,
      16 sequences per DP rank, 38-43% BF16 MFU across its configurations (41% for this one);
    - section 3.3.4: 466 job interruptions in a 54-day snapshot of pre-training;
    - Llama 3.1 model card (github.com/meta-llama/llama-models, models/llama3_1/MODEL_CARD.md):
      30.84M H100 GPU-hours for 405B.
    Tolerances: FLOPs 2% for 6ND, +10% with attention; MFU within 3 points of the 38-43% band;
    interruptions 5%; GPU-hours 15%.
    """
    model = ModelSettings(preset="405b")
    facts = ModelFacts(model, 8192)
    tokens = 15.6e12
    assert 6 * facts.params * tokens == pytest.approx(3.8e25, rel=0.02)
    assert 1.0 <= facts.flops_per_token * tokens / 3.8e25 <= 1.10

    # Their layout, communicating once per step (Megatron's distributed optimizer) and without
    # recomputation: the cost model lands inside the reported band.
    layout = Layout(1, 128, 8, 16, 1, "none", virtual_stages=8)
    cost = CostModel(facts, H100, 8, efficiency=0.5, gather_once_per_step=True)
    step, _ = cost.step(layout, 16)
    mfu = facts.flops_per_token * 16 * 2**20 / (step * 16384 * H100.peak_bf16_flops)
    assert 0.35 <= mfu <= 0.46

    # The search finds what Meta found: TP 8 inside a node and pipeline stages across nodes.
    plan = make_plan(PlanRequest(gpu="h100", gpus=16384, model=model, tokens=tokens,
                                 global_batch_tokens=16 * 2**20))
    assert plan.best.layout.tp == 8 and plan.best.layout.pp > 1
    assert plan.best.global_batch_tokens == 16 * 2**20

    # Failures: the default rate reproduces the 54-day snapshot, and at the reported 41% MFU the whole
    # run costs what the model card says.
    reliability = sched.Reliability(sched.LLAMA3_FAILURES_PER_GPU_HOUR, 60, 600, 16384)
    assert reliability.interruptions(54 * 86400) == pytest.approx(466, rel=0.05)
    assert reliability.mtbf_seconds / 3600 == pytest.approx(54 * 24 / 466, rel=0.01)
    rate = 0.41 * 16384 * H100.peak_bf16_flops / (6 * facts.params)
    run = sched.Schedule(tokens, 3.8e25, rate, 16384, reliability)
    assert run.gpu_hours == pytest.approx(30.84e6, rel=0.15)
    assert 54 < run.days < 90


def test_gpt3_175b_compute():
    """GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv 2005.14165,
    Table D.1: 3.64e3 petaflop/s-days = 3.14e23 FLOPs for 300B tokens (96 layers, d_model 12288, 96 heads,
    context 2048). Murmur's SwiGLU block with ffn 32768 (8/3 d) has the same weights as GPT-3's 4d GELU MLP.
    Tolerances: parameters 1%, 6ND 2%, with attention FLOPs +5%.
    """
    gpt3 = ModelSettings(vocab_size=50257, dim=12288, n_layers=96, n_heads=96, ffn_dim=32768, max_seq_len=2048)
    facts = ModelFacts(gpt3, 2048)
    assert facts.params == pytest.approx(175e9, rel=0.01)
    assert 6 * facts.params * 300e9 == pytest.approx(3.14e23, rel=0.02)
    assert 1.0 <= facts.flops_per_token * 300e9 / 3.14e23 <= 1.05


def test_search_is_consistent_for_16k_gpus():  # its speed is in bench/plan_search.py, not asserted here
    facts = ModelFacts(ModelSettings(preset="70b"), 8192)
    result = search(facts, H100, 16384, 8, 0.5, None, 16 * 2**20)
    assert result.candidates, "70B fits on 16k H100s"
    rates = [c.tokens_per_second for c in result.candidates]
    assert rates == sorted(rates, reverse=True)
    for c in result.candidates[:50]:
        assert c.layout.world == 16384
        assert c.memory.total <= H100.memory_bytes
        assert c.global_batch_tokens == c.layout.dp * c.layout.micro_batch_size * 8192 * c.microbatches
        assert 0 < c.mfu <= 0.5
        assert c.layout.pp == 1 or c.microbatches >= c.layout.pp


def test_exact_global_batch_is_respected():
    facts = ModelFacts(ModelSettings(preset="1b"), 4096)
    result = search(facts, H100, 64, 8, 0.5, 2**21, 2**21)
    assert result.candidates
    assert {c.global_batch_tokens for c in result.candidates} == {2**21}


def test_chinchilla_and_compute_optimal_model():
    """Hoffmann et al. 2022 (arXiv 2203.15556): about 20 tokens per parameter; Chinchilla itself is
    70B parameters on 1.4T tokens, about 5.8e23 FLOPs (6ND)."""
    assert sched.chinchilla_tokens(70e9) == pytest.approx(1.4e12)
    assert sched.compute_optimal_params(6 * 70e9 * 1.4e12) == pytest.approx(70e9, rel=0.01)
    plan = make_plan(PlanRequest(gpu="h100", gpus=1024, budget_flops=5.88e23))
    assert plan.facts.params == pytest.approx(70e9, rel=0.05)
    assert plan.schedule.tokens == pytest.approx(20 * plan.facts.params, rel=1e-6)


def test_days_budget_sizes_a_model_that_fills_the_days():
    plan = make_plan(PlanRequest(gpu="h100", gpus=1024, days=30))
    s = plan.schedule
    assert s.days == pytest.approx(30, rel=0.02)
    # Compute-optimal: the tokens trainable in 30 days are about 20 per parameter.
    assert s.tokens / plan.facts.params == pytest.approx(20, rel=0.1)
    more = make_plan(PlanRequest(gpu="h100", gpus=1024, days=90))
    assert more.facts.params > plan.facts.params


def test_young_daly_interval_and_goodput():
    # Young: sqrt(2 C M) to first order; Daly's correction is small when C << M.
    c, m = 60.0, 10 * 3600.0
    assert sched.checkpoint_interval(c, m) == pytest.approx(math.sqrt(2 * c * m), rel=0.05)
    assert sched.checkpoint_interval(100, 10) == 10  # checkpoints slower than failures: checkpoint each MTBF
    small = sched.Reliability(sched.LLAMA3_FAILURES_PER_GPU_HOUR, 60, 600, 64)
    large = sched.Reliability(sched.LLAMA3_FAILURES_PER_GPU_HOUR, 60, 600, 65536)
    assert 0.99 < small.goodput <= 1 and large.goodput < small.goodput
    assert sched.Reliability(0, 60, 600, 65536).goodput == 1
    # The interval minimises lost time: a shorter or longer one does worse.
    lost = lambda tau: c / tau + (600 + (tau + c) / 2) / m  # noqa: E731
    best = sched.checkpoint_interval(c, m)
    assert lost(best) < lost(best / 2) and lost(best) < lost(best * 2)


def test_shape_for_params_uses_llama_proportions():
    shape = shape_for_params(8e9)
    assert (shape.dim, shape.n_layers, shape.n_heads, shape.kv_heads, shape.hidden_dim) == (4096, 32, 32, 8, 14336)
    for target in (2e8, 3e10, 1e12):
        assert count_params(shape_for_params(target)) == pytest.approx(target, rel=0.02)


def test_gpu_table_and_unknown_names():
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200"):
        gpu = GPUS[name]
        assert gpu.memory_bytes > 0 and gpu.peak_bf16_flops > 1e14
        assert gpu.inter_node_bandwidth < gpu.intra_node_bandwidth
    assert get_gpu("H100").name == "h100-sxm"
    with pytest.raises(MurmurError, match="known GPUs: a100-40gb, a100-80gb, h100-sxm"):
        get_gpu("tpu-v5")


def test_a_model_too_large_says_what_would_fit():
    with pytest.raises(NoLayoutError) as err:
        make_plan(PlanRequest(gpu="a100-40gb", gpus=8, model=ModelSettings(preset="405b")))
    message = str(err.value)
    assert "no layout" in message and "fits on" in message and "a100-40gb" in message
    # The suggestion holds: that many GPUs does fit.
    count = int(message.split("it fits on ")[1].split(" x ")[0])
    assert make_plan(PlanRequest(gpu="a100-40gb", gpus=count, model=ModelSettings(preset="405b"))).best
    with pytest.raises(NoLayoutError, match="or on 8 x .*b200"):
        make_plan(PlanRequest(gpu="a100-40gb", gpus=8, model=ModelSettings(preset="70b"), seq_len=4096))
