"""The engine's memory is sized from settings and free memory, never from a model's claimed context alone.

A config may say 1,000,000 positions; the KV cache must still fit its budget (a share of free memory, or
`kv_cache_bytes`): the context shrinks first, then the batch, and one start-up line says what was chosen.
"""

from __future__ import annotations

import logging

import pytest
import torch
from serve_fixtures import make_tokenizer, naive_greedy

from murmur.errors import MurmurError
from murmur.infer import kv_cache
from murmur.infer.engine import Engine, PrefixStore
from murmur.infer.kv_cache import MIN_SHRUNK_CONTEXT, available_memory, bytes_per_position, plan_cache
from murmur.infer.sampling import SamplingParams
from murmur.model import Transformer
from murmur.settings.model import ModelSettings

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 2**20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def shape(vocab: int, max_seq_len: int) -> ModelSettings:
    """32 bytes of keys and values per position in float32: 1 layer x 1 kv head x head_dim 4 x (k, v)."""
    return ModelSettings(vocab_size=vocab, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16,
                         max_seq_len=max_seq_len, init_std=0.3)


def cache_bytes(engine: Engine) -> int:
    return sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v)


def test_a_config_claiming_a_million_positions_gets_a_bounded_cache(tok, monkeypatch, caplog):
    torch.manual_seed(0)
    model = Transformer(shape(tok.vocab_size, 1_000_000)).eval()
    # 2 MiB free: the default share (half) gives the cache 1 MiB; the model's full context would need 64 MB.
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 2 * MIB, raising=False)
    with caplog.at_level(logging.INFO, logger="murmur.infer"):
        engine = Engine(model, tok, max_batch_size=2)
    assert cache_bytes(engine) <= 1 * MIB
    rows = tok.vocab_size * 5  # each slot's sampler rows (seen, counts), counted in the budget too
    assert (engine.max_batch_size, engine.max_seq_len) == (2, (1 * MIB - 2 * rows) // (2 * 32))
    [line] = [r for r in caplog.records if "KV cache" in r.getMessage()]
    message = line.getMessage()
    assert line.levelno == logging.WARNING  # the model's context was cut: the operator should see it
    for fact in ("max_batch_size=2", f"max_seq_len={engine.max_seq_len}", f"{cache_bytes(engine):,} bytes",
                 "1,000,000", "kv_cache_memory_fraction"):
        assert fact in message
    # It serves within the chosen context, and refuses what does not fit with the usual error.
    prompt = tok.encode("hello world")
    [result] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert result.token_ids == naive_greedy(model, prompt, 4)
    with pytest.raises(MurmurError, match=f"context is {engine.max_seq_len} tokens"):
        engine.generate([[5] * engine.max_seq_len])


def test_an_explicit_byte_budget_and_context(tok):
    model = Transformer(shape(tok.vocab_size, 1_000_000)).eval()
    rows = tok.vocab_size * 5  # each slot's sampler rows (seen, counts), counted in the budget too
    engine = Engine(model, tok, max_batch_size=4, max_seq_len=3000, kv_cache_bytes=4 * (3000 * 32 + rows))
    assert (engine.max_batch_size, engine.max_seq_len, cache_bytes(engine)) == (4, 3000, 4 * 3000 * 32)
    small = Engine(model, tok, max_batch_size=4, max_seq_len=3000, kv_cache_bytes=2 * (3000 * 32 + rows) + 5)
    assert (small.max_batch_size, small.max_seq_len) == (2, 3000)  # an asked-for context is kept; the batch gives


def test_the_plan_cuts_the_context_then_the_batch_then_refuses():
    big = shape(320, 1_000_000)
    per = bytes_per_position(big, torch.float32)
    assert per == 32
    fits = plan_cache(shape(320, 96), torch.float32, max_batch_size=16, budget_bytes=MIB)
    assert (fits.max_batch_size, fits.max_seq_len, fits.bytes, fits.shrunk) == (16, 96, 16 * 96 * 32, False)
    cut = plan_cache(big, torch.float32, max_batch_size=16, budget_bytes=16 * 5000 * per + 7)
    assert (cut.max_batch_size, cut.max_seq_len, cut.shrunk) == (16, 5000, True)
    # Below MIN_SHRUNK_CONTEXT the context stops shrinking and the batch gives way.
    floor = plan_cache(big, torch.float32, max_batch_size=16, budget_bytes=3 * MIN_SHRUNK_CONTEXT * per)
    assert (floor.max_batch_size, floor.max_seq_len) == (3, MIN_SHRUNK_CONTEXT)
    # A kept prefix store is budgeted as one more slot.
    reserve = plan_cache(big, torch.float32, max_batch_size=4, budget_bytes=5 * 4000 * per, reserve_slots=1)
    assert (reserve.max_batch_size, reserve.max_seq_len, reserve.bytes) == (4, 4000, 4 * 4000 * per)
    with pytest.raises(MurmurError, match="kv_cache_bytes"):
        plan_cache(big, torch.float32, max_batch_size=1, max_seq_len=4096, budget_bytes=4095 * per)
    with pytest.raises(MurmurError, match="kv_cache_memory_fraction"):
        plan_cache(big, torch.float32, max_batch_size=1, budget_bytes=per)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n")
    assert available_memory(torch.device("cpu"), meminfo=meminfo) == 8192 * 1024
    assert available_memory(torch.device("cpu")) > 0  # this machine's own figure (or the fallback)


def test_prefix_store_holds_at_most_one_slot_of_keys(tok):
    """The kept system-prompt prefixes are bounded in bytes as well as in number (one slot's worth), so a
    caller sending many long distinct system prompts cannot grow memory past the budgeted cache."""
    torch.manual_seed(0)
    model = Transformer(shape(tok.vocab_size, 96)).eval()
    engine = Engine(model, tok, max_batch_size=2, prefix_cache=8)
    slot = 96 * 32
    assert engine.prefixes.max_bytes == slot
    for i in range(8):
        system = f"system prompt number {i}: be kind and brief"  # 42 tokens: 8 of them would be 3.5 slots
        engine.generate([[{"role": "system", "content": system}, {"role": "user", "content": "hi"}]],
                        SamplingParams(temperature=0, max_tokens=1))
    assert 0 < engine.prefixes.bytes <= slot
    assert engine.prefixes.bytes == sum(t.numel() * t.element_size()
                                        for k, v in engine.prefixes.entries.values() for t in k + v)
    assert 1 < len(engine.prefixes.entries) < 8
    store = PrefixStore(capacity=8, max_bytes=100)
    store.put((1,), [torch.zeros(30)], [torch.zeros(30)])  # 240 bytes: larger than the store, not kept
    assert store.entries == {} and store.bytes == 0


def test_serve_settings_reach_the_engine(monkeypatch):
    from murmur.serve import launch
    from murmur.settings.serve import ServeSettings

    seen = {}

    class FakeEngine:
        @classmethod
        def from_source(cls, src, **kwargs):
            seen.update(kwargs)
            return cls()

        def warmup(self, background=False):
            pass

    monkeypatch.setattr("murmur.infer.engine.Engine", FakeEngine)
    settings = ServeSettings(device="cpu", kv_cache_bytes=123_456, kv_cache_memory_fraction=0.25)
    launch.build_engine("unused", settings)
    assert seen["kv_cache_bytes"] == 123_456 and seen["kv_cache_memory_fraction"] == 0.25
    assert ServeSettings().kv_cache_memory_fraction == 0.5 and ServeSettings().kv_cache_bytes is None
