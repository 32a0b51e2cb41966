"""Murmur's own CPU kernels (murmur/infer/cpu_kernels): the products equal PyTorch's within rounding on every
instruction set the library picks from, the int8 lanes cannot overflow, bad inputs are refused, and a machine
without a compiler (or a damaged cache) still serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from murmur.infer import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"Murmur's CPU kernels: {cpu_kernels.why_not()}")

# Shapes that reach every branch: 1 row (4-row weight blocks), passes of 8 (AVX-512) and 4 (AVX2) rows with
# a remainder, a last odd weight row, columns that are not a multiple of the vector width (masked/scalar
# tails), and enough output columns (> 256) to split over threads.
CASES = [(1, 576, 960), (1, 37, 5), (3, 100, 7), (8, 64, 258), (9, 33, 3), (17, 1536, 41), (31, 5, 300)]

# Runs in a subprocess with ATEN_CPU_CAPABILITY set: the kernels pick their instruction set once per process.
CHECK = textwrap.dedent("""
    import json, sys, torch
    from murmur.infer import cpu_kernels
    assert cpu_kernels.available(), cpu_kernels.why_not()
    cases = json.loads(sys.argv[1])
    torch.manual_seed(0)
    errors = []
    for rows, k, n in cases:
        for x_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k).to(x_dtype)
            w = torch.randn(n, k)
            bias = torch.randn(n)
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            scales = torch.rand(n) + 0.01
            xf = x.float()
            for got, want in (
                (torch.ops.murmur_cpu.linear_float(x, w, bias), xf @ w.t() + bias),
                (torch.ops.murmur_cpu.linear_float(x, w, None), xf @ w.t()),
                (torch.ops.murmur_cpu.linear_int8(x, q, scales, bias), (xf @ q.float().t()) * scales + bias),
                (torch.ops.murmur_cpu.linear_int8(x, q, scales.bfloat16(), None),
                 (xf @ q.float().t()) * scales.bfloat16().float()),
            ):
                assert got.dtype == x_dtype and got.shape == (rows, n), (got.dtype, got.shape)
                got, want = got.float(), want.to(x_dtype).float()
                errors.append(float((got - want).abs().max() / want.abs().max()))
    print(json.dumps({"isa": cpu_kernels.isa(), "max_relative_error": max(errors)}))
""")


def run_check(capability: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_products_match_pytorch_on_every_instruction_set():
    """The plain C++ kernels ("default"), AVX2 ("avx2", what a laptop has) and the best here (AVX-512 and its
    VNNI variant where the CPU has them) all compute x @ w^T (* scales) + bias."""
    seen = set()
    for capability in ("default", "avx2", None):
        result = run_check(capability)
        seen.add(result["isa"])
        # float32: summation order only; int8 weights: the activations' int16 rounding (3e-5 of a row's max)
        # and, for bfloat16 inputs, the output's own rounding (2^-8).
        assert result["max_relative_error"] < 5e-3, (capability, result)
    assert "scalar" in seen and len(seen) >= 2, seen


def test_aten_cpu_capability_caps_the_instruction_set():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert run_check("default")["isa"] == "scalar"
    assert run_check("avx2")["isa"] == ("avx2" if {"avx2", "fma"} <= flags else "scalar")


def test_int8_lanes_fold_before_they_overflow():
    """20,000 columns of |127| weights times full-scale activations: each int32 lane would reach ~5e9 (past
    2^31) without folding into float every 4,096 columns."""
    k = 20_000
    w = torch.full((3, k), 127, dtype=torch.int8)
    w[1] = -127
    x = torch.ones(1, k) * 3.0
    out = torch.ops.murmur_cpu.linear_int8(x, w, torch.ones(3), None)
    expected = torch.tensor([[127 * 3.0 * k, -127 * 3.0 * k, 127 * 3.0 * k]])
    assert torch.allclose(out, expected, rtol=1e-5), out


def test_a_non_finite_activation_row_gives_nan_and_leaves_the_other_rows_alone():
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    w = torch.randint(-127, 128, (10, 64), dtype=torch.int8)
    out = torch.ops.murmur_cpu.linear_int8(x, w, torch.ones(10), None)
    assert bool(out[1].isnan().all()) and bool(torch.isfinite(out[[0, 2]]).all())
    assert bool(torch.ops.murmur_cpu.linear_float(x, w.float(), None)[1].isinf().any())


def test_two_threads_compute_the_same_products_as_one():
    """Threads split the output columns; each column is computed by one thread in the same order."""
    x, w = torch.randn(5, 300), torch.randn(2000, 300)
    q = torch.randint(-127, 128, (2000, 300), dtype=torch.int8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (torch.ops.murmur_cpu.linear_float(x, w, None), torch.ops.murmur_cpu.linear_int8(x, q, torch.ones(2000), None))
        torch.set_num_threads(2)
        two = (torch.ops.murmur_cpu.linear_float(x, w, None), torch.ops.murmur_cpu.linear_int8(x, q, torch.ones(2000), None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.murmur_cpu.linear_float(torch.randn(2, 8), torch.randn(4, 9), None), "columns"),
    (lambda: torch.ops.murmur_cpu.linear_float(torch.randn(2, 8), torch.randn(8, 4).t(), None), "contiguous"),
    (lambda: torch.ops.murmur_cpu.linear_float(torch.randn(2, 8).double(), torch.randn(4, 8), None), "float32 or bfloat16"),
    (lambda: torch.ops.murmur_cpu.linear_float(torch.randn(8), torch.randn(4, 8), None), "takes x"),
    (lambda: torch.ops.murmur_cpu.linear_int8(torch.randn(2, 8), torch.randn(4, 8), torch.ones(4), None), "must be Char"),
    (lambda: torch.ops.murmur_cpu.linear_int8(torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None),
     "one scale per weight row"),
])
def test_bad_inputs_are_refused_with_what_was_wrong(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_shapes_pass_through_the_meta_kernels_for_torch_compile():
    out = torch.ops.murmur_cpu.linear_int8(torch.empty(3, 8, device="meta", dtype=torch.bfloat16),
                                           torch.empty(5, 8, device="meta", dtype=torch.int8),
                                           torch.empty(5, device="meta"), None)
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16


LOAD = textwrap.dedent("""
    import json, torch
    from murmur.infer import cpu_kernels
    from murmur.infer.quantize import int8_kernel
    print(json.dumps({"available": cpu_kernels.available(), "why_not": cpu_kernels.why_not(),
                      "int8_kernel": int8_kernel(torch.device("cpu"))}))
""")


def load_in(env_changes: dict[str, str]) -> dict:
    env = {**os.environ, **env_changes}
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_a_compiler_serving_falls_back_to_torch_kernels_and_says_why(tmp_path):
    result = load_in({"PATH": str(tmp_path), "CXX": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result["available"] is False and "no C++ compiler" in result["why_not"]
    assert result["int8_kernel"] in ("int8pack", "dequantize")


def test_murmur_cpu_kernels_0_turns_them_off():
    result = load_in({"MURMUR_CPU_KERNELS": "0"})
    assert result["available"] is False and result["why_not"] == "MURMUR_CPU_KERNELS=0"


def test_a_damaged_cached_library_is_built_again(tmp_path):
    """The build renames a finished file into place, so a crash leaves no half-written library; a file damaged
    afterwards (a full disk, a bad copy) is replaced instead of disabling the kernels for good."""
    cache = tmp_path / "cache"
    assert load_in({"XDG_CACHE_HOME": str(cache)})["available"] is True
    [library] = list(cache.glob("murmur/cpu_kernels/*/" + cpu_kernels.LIBRARY_NAME))
    library.write_bytes(b"\x7fELF this is not a shared library")
    assert load_in({"XDG_CACHE_HOME": str(cache)})["available"] is True
    assert library.stat().st_size > 10_000
    assert [p.name for p in library.parent.iterdir()] == [cpu_kernels.LIBRARY_NAME]  # no scratch left behind


def test_the_cache_key_changes_with_the_source(monkeypatch, tmp_path):
    compiler = cpu_kernels._compiler()
    before = cpu_kernels._key(compiler)
    changed = tmp_path / "small_batch_linear.cpp"
    changed.write_text(cpu_kernels.SOURCES[-1].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (*cpu_kernels.SOURCES[:-1], changed))
    assert cpu_kernels._key(compiler) != before


def test_the_kernels_build_wherever_a_compiler_is():
    """The module skips when the kernels are unavailable; this keeps a broken build from passing as a skip on
    a machine that has a compiler (CI's does)."""
    if cpu_kernels._compiler() is None or os.environ.get("MURMUR_CPU_KERNELS") == "0":
        pytest.skip("no C++ compiler here")
    assert cpu_kernels.available(), cpu_kernels.why_not()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_mul_compute_what_the_models_modules_do(dtype):
    from murmur.model import RMSNorm

    torch.manual_seed(1)
    norm = RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    norm = norm.to(dtype)
    x, delta = (torch.randn(5, 96) * 3).to(dtype), torch.randn(5, 96).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert torch.allclose(torch.ops.murmur_cpu.rms_norm(x, norm.weight, norm.eps), norm(x), **tolerance)
    stream = x.clone()
    normed = torch.ops.murmur_cpu.add_rms_norm_(stream, delta, norm.weight, norm.eps)
    assert torch.equal(stream, x + delta)  # the residual add, rounded as PyTorch rounds it
    assert torch.allclose(normed, norm(x + delta), **tolerance)
    gate_up = torch.randn(3, 2 * 40).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(torch.ops.murmur_cpu.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def reference_attention(qkv, cos, sin, kv, positions, heads, kv_heads):
    """PackedDecoder's PyTorch path for one layer: rope by roll, index_copy_ into the cache, SDPA with a mask."""
    batch, head_dim = qkv.shape[0], kv.shape[-1]
    rotated = heads + kv_heads
    qk = qkv[:, :rotated * head_dim].view(batch, rotated, head_dim)
    qkv[:, :rotated * head_dim] = (qk * cos[:, None] + torch.roll(qk, head_dim // 2, -1) * sin[:, None]).view(batch, -1)
    for b, pos in enumerate(positions.tolist()):
        kv[0, b, :, pos] = qkv[b, heads * head_dim:rotated * head_dim].view(kv_heads, head_dim)
        kv[1, b, :, pos] = qkv[b, rotated * head_dim:].view(kv_heads, head_dim)
    length = int(positions.max()) + 1
    keys = torch.arange(length)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    q = qkv[:, :heads * head_dim].view(batch, heads, 1, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, kv[0, :batch, :, :length], kv[1, :batch, :, :length],
                                                           attn_mask=mask, enable_gqa=heads != kv_heads)
    return out.reshape(batch, heads * head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, batch", [(4, 4, 1), (6, 2, 3), (9, 3, 8)])
def test_attention_rotates_writes_the_cache_and_attends_as_pytorch_does(dtype, heads, kv_heads, batch):
    torch.manual_seed(heads * batch)
    head_dim, slots, max_len = 16, 8, 40
    kv = torch.randn(2, slots, kv_heads, max_len, head_dim).to(dtype)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([5, 0, 39, 17, 3, 3, 20, 1][:batch])
    angles = positions[:, None].float() * (1 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos = angles.cos().to(dtype).repeat(1, 2)
    sin = angles.sin().to(dtype)
    sin = torch.cat((-sin, sin), dim=-1)
    ours_qkv, ours_kv = qkv.clone(), kv.clone()
    out = torch.ops.murmur_cpu.attend_(ours_qkv, cos, sin, ours_kv, positions, heads, kv_heads)
    expected_qkv, expected_kv = qkv.clone(), kv.clone()
    expected = reference_attention(expected_qkv, cos, sin, expected_kv, positions, heads, kv_heads)
    assert torch.equal(ours_qkv, expected_qkv)  # rope rounds as the eager ops do
    assert torch.equal(ours_kv, expected_kv)  # the new keys and values, and nothing else
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and torch.allclose(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_attention_refuses_a_position_outside_the_cache():
    kv = torch.zeros(2, 2, 1, 8, 4)
    qkv, cos, sin = torch.zeros(1, 12), torch.zeros(1, 4), torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="position 8 outside the cache"):
        torch.ops.murmur_cpu.attend_(qkv, cos, sin, kv, torch.tensor([8]), 1, 1)
    with pytest.raises(RuntimeError, match="more rows than cache slots"):
        torch.ops.murmur_cpu.attend_(torch.zeros(3, 12), torch.zeros(3, 4), torch.zeros(3, 4), kv,
                                     torch.tensor([0, 1, 2]), 1, 1)


def test_the_parallel_loops_are_compiled_with_openmp():
    """at::parallel_for is inline in torch's headers and runs serially unless the library is compiled with
    OpenMP (which it was not at first: 2 threads ran exactly as fast as one). Its OpenMP calls import
    GOMP_parallel, bound at load to the libgomp torch ships."""
    [library] = [Path(p) for p in torch.ops.loaded_libraries if Path(p).name == cpu_kernels.LIBRARY_NAME]
    assert b"GOMP_parallel" in library.read_bytes()
