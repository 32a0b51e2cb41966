"""Murmur's CPU decode kernels against the library kernels they replace (not in CI).

    .venv/bin/python bench/cpu_kernels.py [--threads 1] [--rows 1 8] [--repeats 15]

SmolLM2-135M's products over all 30 layers' weights (so the weights stream from memory, as in a decode step:
qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) and its 49152x576 head, for a decode step's rows:

- float32 weights: `torch.ops.murmur_cpu.linear_float` against MKL (`torch.mm(W, x^T)` for one row, the
  engine's layout, and `F.linear` for more);
- int8 weights (one scale per row): `torch.ops.murmur_cpu.linear_int8` against `torch._weight_int8pack_mm`
  (bfloat16 activations, its fast path) and, for several rows, `torch._int_mm` with the activations
  already rounded to int8 (the product alone, without the rounding that serving adds).

Prints milliseconds (medians of --repeats, the two interleaved) and the ratio reference/Murmur per product,
and GB/s of weights read. Set ATEN_CPU_CAPABILITY=avx2 to measure what a laptop without AVX-512 gets: it caps
Murmur's kernels and PyTorch's alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from murmur.infer import cpu_kernels

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = (49152, 576)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, ours, theirs: dict, nbytes: int, repeats: int) -> None:
    """Interleave Murmur's kernel with each reference and print medians, ratios and bandwidth."""
    results = {"murmur": [], **{label: [] for label in theirs}}
    for _ in range(repeats):
        results["murmur"] += timed(ours, 1)
        for label, fn in theirs.items():
            results[label] += timed(fn, 1)
    mine = statistics.median(results["murmur"])
    parts = [f"murmur {mine * 1e3:7.2f} ms ({nbytes / mine / 1e9:5.1f} GB/s)"]
    for label in theirs:
        other = statistics.median(results[label])
        parts.append(f"{label} {other * 1e3:7.2f} ms (x{other / mine:4.2f})")
    print(f"  {name:<8} " + "  ".join(parts), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"Murmur's CPU kernels are not available here: {cpu_kernels.why_not()}")
    torch.set_num_threads(args.threads)
    ours_float, ours_int8 = torch.ops.murmur_cpu.linear_float, torch.ops.murmur_cpu.linear_int8
    print(f"kernels: {cpu_kernels.isa()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"{args.threads} thread(s); ms over {LAYERS} layers' weights (the head: one), medians of {args.repeats}")
    torch.manual_seed(0)
    shapes = {name: (shape, LAYERS) for name, shape in SHAPES.items()} | {"head": (HEAD, 1)}
    for rows in args.rows:
        print(f"\n{rows} row(s), float32 weights (reference: MKL)")
        for name, ((n, k), count) in shapes.items():
            weights = [torch.randn(n, k) for _ in range(count)]
            x = torch.randn(rows, k)
            mkl = (lambda: [torch.mm(w, x.t()) for w in weights]) if rows == 1 else \
                (lambda: [F.linear(x, w) for w in weights])
            compare(name, lambda: [ours_float(x, w, None) for w in weights], {"mkl": mkl}, 4 * n * k * count,
                    args.repeats)
            del weights
        print(f"{rows} row(s), int8 weights (references: int8pack with bfloat16 activations; _int_mm with int8 ones)")
        for name, ((n, k), count) in shapes.items():
            weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
            scales = torch.rand(n)
            x = torch.randn(rows, k)
            x_bf16, scales_bf16 = x.bfloat16(), scales.bfloat16()
            theirs = {"int8pack": lambda: [torch._weight_int8pack_mm(x_bf16, w, scales_bf16) for w in weights]}
            if rows > 1:
                x_int8 = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
                theirs["_int_mm"] = lambda: [torch._int_mm(x_int8, w.t()) for w in weights]
            compare(name, lambda: [ours_int8(x, w, scales, None) for w in weights], theirs, n * k * count,
                    args.repeats)
            del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
