"""The engine's packed decode step (murmur/infer/decode.py): the model's tokens from far fewer operations,
on the model's own weights."""

from __future__ import annotations

import pytest
import torch
from serve_fixtures import SlowTransformer, recite_corpus, tokenizer  # noqa: F401 (tokenizer: a fixture)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.infer.decode import _norm
from murmur.model import RMSNorm, Transformer, generate_greedy
from murmur.settings.model import ModelSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello world", "the quick brown fox", "coffee in the morning", "naïve café", "héllo wörld",
           "**bold** and", "music at night", "a long walk"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def tiny_settings(vocab_size: int, **kw) -> ModelSettings:
    base = {"vocab_size": vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
            "max_seq_len": 256, "init_std": 0.3}
    return ModelSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tokenizer) -> dict[str, torch.Tensor]:
    """A tiny model trained to recite the corpus: clear margins between its greedy choices."""
    torch.manual_seed(0)
    return recite_corpus(Transformer(tiny_settings(tokenizer.vocab_size)), tokenizer)


def fresh(tokenizer, weights, cls=Transformer, **kw) -> Transformer:
    model = cls(tiny_settings(tokenizer.vocab_size, **kw))
    model.load_state_dict(weights)
    return model.eval()


def test_packed_greedy_tokens_equal_the_models_own_forward(tokenizer, trained):
    reference = fresh(tokenizer, trained)
    expected = [generate_greedy(reference, tokenizer.encode(p), GREEDY.max_tokens) for p in PROMPTS]
    engine = Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=8)
    assert engine.decode_path == "packed"
    # All eight at once (a decode batch of rows at different positions), then one at a time.
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected
    assert [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS[:3]] == expected[:3]


def test_packed_int8_tokens_equal_the_int8_models_forward(tokenizer, trained):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
    plain = Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=8, quantize="int8", packed_decode=False)
    packed = Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=8, quantize="int8")
    assert plain.decode_path.startswith("model forward") and packed.decode_path == "packed"
    for prompts in (PROMPTS, PROMPTS[:1]):  # int8 activations in a batch, int8pack for one row
        want, got = plain.generate(prompts, params), packed.generate(prompts, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        gaps = [abs(a.logprob - b.logprob) for w, g in zip(want, got) for a, b in zip(w.logprobs, g.logprobs)]
        assert max(gaps) < 0.05


@pytest.mark.parametrize("variant", [{"qk_norm": True, "attn_bias": True}, {"n_kv_heads": 4},
                                     {"n_kv_heads": 1, "tie_embeddings": True}])
def test_packed_logits_match_the_model_path_on_other_layouts(tokenizer, variant):
    """Qwen-style QK-norm and q/k/v biases, plain multi-head and multi-query attention, a tied head."""
    torch.manual_seed(1)
    weights = Transformer(tiny_settings(tokenizer.vocab_size, **variant)).state_dict()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)
    plain = Engine(fresh(tokenizer, weights, **variant), tokenizer, packed_decode=False).generate(PROMPTS[:4], params)
    packed_engine = Engine(fresh(tokenizer, weights, **variant), tokenizer)
    assert packed_engine.decode_path == "packed"
    packed = packed_engine.generate(PROMPTS[:4], params)
    assert [c.token_ids for c in packed] == [c.token_ids for c in plain]
    for w, g in zip(plain, packed):
        for a, b in zip(w.logprobs, g.logprobs):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-4


def test_packing_adds_no_memory_the_layers_view_the_packed_weights(tokenizer, trained):
    model = fresh(tokenizer, trained)

    def storage_bytes(m: nn.Module) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*m.parameters(), *m.buffers()]}
        return sum(storages.values())

    before = storage_bytes(model)
    engine = Engine(model, tokenizer, max_batch_size=2)
    attn, mlp = engine.model.layers[0].self_attn, engine.model.layers[0].mlp
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert storage_bytes(engine.model) == before
    # The model's own forward still computes with the (repacked) weights: prefill goes through it.
    assert engine.generate(["hello world"], GREEDY)[0].token_ids == generate_greedy(
        fresh(tokenizer, trained), tokenizer.encode("hello world"), GREEDY.max_tokens)


class CountOps(TorchDispatchMode):
    PRODUCTS = {"linear", "mm", "addmm", "_int_mm", "_weight_int8pack_mm", "linear_float", "linear_int8"}

    def __init__(self):
        super().__init__()
        self.ops = self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.products += func.overloadpacket.__name__ in self.PRODUCTS
        return func(*args, **(kwargs or {}))


def decode_step_ops(engine: Engine) -> CountOps:
    """The aten operations of one decode step of 4 rows (the head included)."""
    with torch.inference_mode():
        tokens = torch.tensor([[5], [6], [7], [8]])
        positions = torch.tensor([3, 9, 1, 4])
        with CountOps() as counter:
            engine._step_logits(tokens, positions, 10)
    return counter


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_packed_decode_step_runs_four_products_a_layer_and_a_third_fewer_ops(tokenizer, trained, quantize):
    """The cost the packed step exists to cut: on a CPU a small model's decode token is bound by its products
    and by launching ops. The model's forward runs 7 products a layer (q, k, v, o, gate, up, down) and ~58 ops
    (views included) in float32; the packed step 4 (qkv, o, gate_up, down) and ~36."""
    layers = tiny_settings(tokenizer.vocab_size).n_layers
    packed = decode_step_ops(Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=4, quantize=quantize))
    model_path = decode_step_ops(Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=4, quantize=quantize,
                                        packed_decode=False))
    assert (packed.products, model_path.products) == (4 * layers + 1, 7 * layers + 1)
    assert packed.ops < 0.75 * model_path.ops, (packed.ops, model_path.ops)


def test_a_model_that_overrides_forward_keeps_its_own_forward(tokenizer, trained):
    """A subclass's forward may do more than the model's (here: sleep, as the cancellation tests' model does);
    the engine must call it, so it does not pack."""
    model = fresh(tokenizer, trained, cls=SlowTransformer)
    engine = Engine(model, tokenizer, max_batch_size=2)
    assert engine.packed_decoder is None and "overrides forward" in engine.decode_path
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    engine.generate(["hello world"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(calls) == 5  # the prefill and four decode steps, all through the model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_norm_is_bitwise_the_models_rmsnorm(dtype):
    """The packed step's norms drop the model's casts where the kernel rounds the same way; the greedy tokens
    of float32 and the int8 path's numerics rest on their being bitwise equal, across magnitudes and widths."""
    torch.manual_seed(0)
    for rows, dim in [(1, 576), (8, 64), (3, 960)]:
        norm = RMSNorm(dim, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(dim) + 0.5)
        norm = norm.to(dtype)
        for scale in (1e-3, 1.0, 300.0):
            x = (torch.randn(rows, dim) * scale).to(dtype)
            with torch.no_grad():
                assert torch.equal(_norm(norm, x), norm(x)), (rows, dim, scale)


def test_a_one_row_int8_step_in_bfloat16_casts_only_the_rotary_angles(tokenizer, trained):
    """An int8 model computing in bfloat16 needs no cast around its norms or products for one row (they were
    two casts a norm: 14 casts a 2-layer step, a tenth of its ops); only the angles are computed in float32."""
    engine = Engine(fresh(tokenizer, trained), tokenizer, max_batch_size=4, quantize="int8")
    if engine.dtype != torch.bfloat16:
        pytest.skip("this CPU computes int8 models in float32 (no native bfloat16)")

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("to", "_to_copy") and out is not args[0]:
                self.casts += 1
            return out

    with torch.inference_mode(), CountCasts() as counter:
        engine._step_logits(torch.tensor([[5]]), torch.tensor([3]), 4)
    assert counter.casts <= 3, counter.casts  # positions to float32, cos and sin to bfloat16
