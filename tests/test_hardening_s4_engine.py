"""The engine's per-slot sampler state (`seen` and `counts`, a row over the whole vocabulary per slot, for the
repetition, presence and frequency penalties) is counted in the KV cache's budget: with a large vocabulary it
outweighs a short context's keys and values, and a budget that ignored it let a full batch overrun memory."""

from __future__ import annotations

import pytest
import torch
from serve_fixtures import make_tokenizer

from murmur.errors import MurmurError
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.model import Transformer
from murmur.settings.model import ModelSettings

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50_000  # a row of `seen` (bool) and `counts` (int32): 250,000 bytes a slot
CONTEXT = 256  # 32 bytes of keys and values a position (1 layer, 1 kv head, head_dim 4, float32): 8 KiB a slot


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelSettings(vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16,
                                     max_seq_len=CONTEXT, init_std=0.3)).eval()


def allocated(engine: Engine) -> int:
    keys_values = sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v)
    return keys_values + engine.seen.numel() * engine.seen.element_size() + \
        engine.counts.numel() * engine.counts.element_size()


def test_the_samplers_rows_are_counted_in_the_budget(tok, model):
    per_slot = CONTEXT * 32 + VOCAB * 5
    budget = 4 * per_slot + 100  # room for 4 slots with their sampler rows; the keys and values alone of 30
    engine = Engine(model, tok, max_batch_size=16, kv_cache_bytes=budget)
    assert allocated(engine) <= budget
    assert (engine.max_batch_size, engine.max_seq_len) == (4, CONTEXT)
    assert engine.cache_plan.state_bytes == 4 * VOCAB * 5 and "sampler state" in engine.cache_plan.describe()
    # The four slots serve penalised requests at once.
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, frequency_penalty=1.0,
                            repetition_penalty=1.3)
    results = engine.generate([tok.encode("hello world")] * 4, params)
    assert [len(r.token_ids) for r in results] == [3] * 4


def test_a_budget_that_cannot_hold_one_slots_sampler_rows_is_refused(tok, model):
    with pytest.raises(MurmurError, match="kv_cache_bytes"):
        Engine(model, tok, max_batch_size=2, kv_cache_bytes=CONTEXT * 32 + VOCAB)  # keys and values fit, rows not
