"""Start-up of a compiled engine: it serves eagerly at once, compiles beside the requests, switches when ready;
the compiled artefacts go to a cache folder that survives reboots."""

from __future__ import annotations

import threading

import pytest
from serve_fixtures import make_model, naive_greedy, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer import compiled as compiled_module
from murmur.infer import engine as engine_module
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from torch._dynamo.utils import counters

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello world", "the quick brown fox jumps over", "coffee"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size, max_seq_len=64)


def expected(engine, model):
    return [naive_greedy(model, engine.encode_prompt(p)[0], GREEDY.max_tokens) for p in PROMPTS]


def test_background_compile_serves_eagerly_first_then_switches_to_the_compiled_step(model, tokenizer, monkeypatch):
    gate = threading.Event()

    class GatedCompile(compiled_module.BackgroundCompile):
        def _run(self):
            gate.wait(120)  # hold the compilation until the engine has served while it was pending
            super()._run()

    monkeypatch.setattr(engine_module, "BackgroundCompile", GatedCompile)
    # One slot: one graph to compile (batch size 1), which keeps the test short.
    engine = Engine(model, tokenizer, max_batch_size=1, compile=True)
    if not engine.compiled:
        pytest.skip("no C++ compiler for torch.compile here")
    want = expected(engine, model)
    engine.warmup(background=True)  # returns at once
    assert engine.background_compile.status == "compiling"
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == want
    assert engine._decode_step == engine._eager_step  # that was the eager step
    gate.set()
    # Requests keep being served, correctly, while the compilation runs beside them.
    while not engine.background_compile.wait(timeout=0.2):
        assert [c.token_ids for c in engine.generate(PROMPTS[:1], GREEDY)] == want[:1]
    assert engine.background_compile.status == "compiled", engine.background_compile.status
    assert engine._decode_step != engine._eager_step
    graphs = counters["stats"]["unique_graphs"]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == want
    # The warm-up's graph serves the requests: none of them compiles another (a SmolLM2 recompile took minutes).
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_background_compile_leaves_the_eager_step_serving(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=3, compile=True)
    if not engine.compiled:
        pytest.skip("no C++ compiler for torch.compile here")

    def broken_step(*args):
        raise RuntimeError("inductor fell over")

    engine._decode_step = broken_step
    engine.warmup(background=True)
    assert engine.background_compile.wait(timeout=60)
    assert engine.background_compile.status == "failed: RuntimeError: inductor fell over"
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected(engine, model)


def test_compiled_artefacts_go_to_murmurs_cache_unless_torch_is_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled_module.use_persistent_cache() == str(tmp_path / "murmur" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled_module.use_persistent_cache() == str(tmp_path / "mine")


def test_the_server_compiles_in_the_background(monkeypatch, tmp_path):
    """`murmur serve --compile` must not hold /health at "loading" for the minutes a compilation takes."""
    from murmur.serve import launch
    from murmur.settings.serve import ServeSettings

    calls = []

    class FakeEngine:
        @classmethod
        def from_source(cls, src, **kwargs):
            calls.append(kwargs)
            return cls()

        def warmup(self, background=False):
            calls.append({"background": background})

    monkeypatch.setattr(engine_module, "Engine", FakeEngine)
    launch.build_engine(tmp_path, ServeSettings(compile=True, quantize="int8", device="cpu"))
    assert calls[0]["compile"] is True and calls[0]["quantize"] == "int8"
    assert calls[1] == {"background": True}
