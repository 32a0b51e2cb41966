"""An int8 model computes in bfloat16 end to end where the CPU multiplies bfloat16 natively: no cast around each
int8 product, a bfloat16 KV cache, prefill on bfloat16 weights; elsewhere it keeps float32 and still serves."""

from __future__ import annotations

import pytest
import torch
from serve_fixtures import make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from murmur import accel
from murmur.infer import quantize as quantize_module
from murmur.infer.engine import Engine
from murmur.infer import cpu_kernels
from murmur.infer.quantize import Int8Linear, int8_activations_run, int8pack_runs, quantize_model
from murmur.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
needs_native_bf16 = pytest.mark.skipif(
    not accel.cpu_bf16_fast(), reason="this CPU has no native bfloat16: the model stays float32 (tested below)")
# Each bfloat16 test runs with both int8 kernels that serve decode steps on a CPU: int8pack (PyTorch's, where
# Murmur's kernels are off or cannot be built) and Murmur's own.
KERNELS = [pytest.param("int8pack", marks=pytest.mark.skipif(not int8pack_runs(CPU), reason="no int8pack here")),
           pytest.param("murmur", marks=pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.why_not())))]
PRODUCT_OP = {"int8pack": "_weight_int8pack_mm", "murmur": "linear_int8"}


@pytest.fixture
def kernel(request):
    """The int8 kernel under test: Murmur's kernels are turned off for "int8pack"."""
    cpu_kernels.set_enabled(request.param == "murmur")
    yield request.param
    cpu_kernels.set_enabled(True)


class OpLog(TorchDispatchMode):
    """Records every aten op run inside it with its tensor arguments' dtypes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), dtypes))
        return func(*args, **(kwargs or {}))

    def casts(self) -> int:
        return sum(name == "_to_copy" for name, _ in self.ops)

    def products(self) -> list[tuple[str, list[torch.dtype]]]:
        return [(name, dtypes) for name, dtypes in self.ops
                if name in ("linear", "mm", "addmm", "_weight_int8pack_mm", "_int_mm", "linear_int8", "linear_float")]


def decode_step_ops(engine: Engine, rows: int = 1) -> OpLog:
    """The ops of one decode step of slots 0..rows-1 at position 3 (the engine's own step, as `warmup` calls it)."""
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    positions = torch.full((rows,), 3)
    with torch.inference_mode(), OpLog() as log:
        logits = engine._step_logits(tokens, positions, 4)
    assert logits.shape == (rows, engine.model.settings.vocab_size)
    return log


@needs_native_bf16
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_model_computes_in_bf16_without_a_cast_around_each_product(tokenizer, kernel):
    engine = Engine(make_model(tokenizer.vocab_size), tokenizer, max_batch_size=2, quantize="int8")
    assert engine.quantization.kernel == kernel
    assert engine.quantization.activations == torch.bfloat16 and "activations in bfloat16" in \
        engine.quantization.describe()
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.model.inv_freq.dtype == torch.float32  # rotary angles keep their precision
    log = decode_step_ops(engine)
    products = log.products()
    # every product is an int8 one (the packed decode step's: q/k/v in one, gate/up in one, o, down; the head)...
    assert engine.decode_path == "packed" and len(products) == 4 * engine.model.settings.n_layers + 1
    assert all(name == PRODUCT_OP[kernel] and dtypes[0] == torch.bfloat16 for name, dtypes in products)
    # ...and no cast surrounds it: what casts remain are the norms' float32 statistics (in and out) and the
    # rotary cos/sin. A float32 model casting in and out of every int8 product made 2 x 15 more.
    norms = 2 * engine.model.settings.n_layers + 1
    assert log.casts() <= 2 * norms + 2


@needs_native_bf16
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_engine_keeps_its_kv_cache_in_bf16_at_half_the_bytes(tokenizer, kernel):
    plain = Engine(make_model(tokenizer.vocab_size), tokenizer, max_batch_size=4, max_seq_len=128)
    int8 = Engine(make_model(tokenizer.vocab_size), tokenizer, max_batch_size=4, max_seq_len=128, quantize="int8")
    assert int8.cache.k[0].dtype == torch.bfloat16 and plain.cache.k[0].dtype == torch.float32
    assert int8.cache_plan.bytes * 2 == plain.cache_plan.bytes


@needs_native_bf16
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_prefill_multiplies_bf16_weights(tokenizer, kernel):
    model = make_model(tokenizer.vocab_size)
    quantize_model(model, "int8")
    tokens = torch.randint(0, tokenizer.vocab_size, (1, 2 * Int8Linear.DEQUANTIZE_ROWS))
    with torch.inference_mode(), OpLog() as log:
        logits = model(tokens)
    products = log.products()
    assert logits.dtype == torch.bfloat16 and len(products) == 15
    assert all(name != PRODUCT_OP[kernel] and set(dtypes) == {torch.bfloat16} for name, dtypes in products)


def test_without_native_bf16_the_int8_model_keeps_float32_and_serves(tokenizer, monkeypatch):
    monkeypatch.setattr(quantize_module.accel, "cpu_bf16_fast", lambda: False)
    model = make_model(tokenizer.vocab_size)
    reference = model(torch.tensor([[1, 2, 3, 4]]))
    engine = Engine(model, tokenizer, max_batch_size=2, quantize="int8")
    assert engine.quantization.activations == torch.float32 and engine.dtype == torch.float32
    assert engine.model.embed_tokens.weight.dtype == torch.float32 and engine.cache.k[0].dtype == torch.float32
    with torch.inference_mode():
        logits = engine.model(torch.tensor([[1, 2, 3, 4]]))
        reference = reference.detach()
    assert logits.dtype == torch.float32
    relative = float((logits - reference).norm() / reference.norm())
    assert 0 < relative < 0.05
    out = engine.generate(["hello world"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


@pytest.mark.skipif(not int8pack_runs(CPU) or not int8_activations_run(CPU),
                    reason="no int8pack or no torch._int_mm on this CPU")
@pytest.mark.usefixtures("torch_kernels_only")
def test_a_decode_batch_multiplies_int8_activations_and_one_row_does_not(tokenizer):
    engine = Engine(make_model(tokenizer.vocab_size), tokenizer, max_batch_size=4, quantize="int8")
    assert engine.quantization.int8_batches
    products = 4 * engine.model.settings.n_layers + 1  # the packed decode step's (qkv, o, gate_up, down; head)
    batch = [name for name, _ in decode_step_ops(engine, rows=4).products()]
    assert batch == ["_int_mm"] * products  # int8pack's time grows with the rows
    single = [name for name, _ in decode_step_ops(engine, rows=1).products()]
    assert single == ["_weight_int8pack_mm"] * products  # its faster one-row kernel


@pytest.mark.parametrize("rows", [2, 8, 31])
def test_int8_activation_products_match_the_float_layer_within_rounding(rows):
    if not int8_activations_run(torch.device("cpu")):
        pytest.skip("torch._int_mm does not run on this CPU")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 40, bias=True)
    x = torch.randn(rows, 96)
    out, expected = Int8Linear.from_linear(linear, "int8pack", int8_activations=True)(x), linear(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    relative = float((out - expected).detach().norm() / expected.detach().norm())
    assert 0 < relative < 0.03
