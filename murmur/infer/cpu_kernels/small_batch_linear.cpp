// Linear products for a few rows (a decode step's tokens) on CPU, read at memory speed.
//
// y[m, n] = sum_k x[m, k] * w[n, k]            (float32 weights)
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (int8 weights, one scale per output row)
//
// Decoding reads every weight once per step and does 2 flops per weight per row, so the product is bound by
// how fast the weights stream from memory. The library kernels Murmur had were not: MKL's gemm over 8 rows
// re-read float32 weights (8 rows ran ~3x one row), and torch's int8 weight-only kernel read int8 weights at
// ~5 GB/s where float32 streams at ~12 (docs/journal.md). Here each block of weight rows is loaded once,
// converted once (int8 -> float32 in registers) and multiplied with every activation row while it sits in
// registers; activations stay float32 (int8 weights are the only rounding, as in `Int8Linear`).
//
// One source, three instruction sets chosen at run time (cpu_isa.h): AVX-512 (16 floats a register, with a
// VNNI variant for int8), AVX2+FMA (8) and plain C++.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using murmur_cpu::Isa;
using murmur_cpu::active_isa;
using murmur_cpu::hsum_avx2;

// The most activation rows one pass keeps in registers; more rows run in passes over the same weight block
// (read again from L1, not memory).
constexpr int kMaxRows = 8;

// Float32 weights: ROWS weight rows at a time (one block), M activation rows, ROWS x M accumulators. The next
// block's lines are prefetched while this one is multiplied: with 8 activation rows the arithmetic is long
// enough that the hardware prefetcher alone left memory idle (1 row: 11 GB/s; 8 rows: 5 GB/s before).

template <int ROWS, int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void float_block_avx512(const float* x, int64_t k,
                                                                          const float* w, float* out,
                                                                          int64_t out_stride) {
  __m512 acc[ROWS][M];
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* next = w + ROWS * k;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      wv[r] = _mm512_loadu_ps(w + r * k + i);
      _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T0);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * k + i);
      for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (i < k) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 wv[ROWS];
    for (int r = 0; r < ROWS; ++r) wv[r] = _mm512_maskz_loadu_ps(tail, w + r * k + i);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * k + i);
      for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) out[m * out_stride + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int ROWS, int M>
__attribute__((target("avx2,fma"))) void float_block_avx2(const float* x, int64_t k, const float* w,
                                                          float* out, int64_t out_stride) {
  __m256 acc[ROWS][M];
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const float* next = w + ROWS * k;
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 wv[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      wv[r] = _mm256_loadu_ps(w + r * k + i);
      if ((i & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T0);
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * k + i);
      for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  float tail[ROWS][M] = {};
  for (; i < k; ++i)
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) tail[r][m] += w[r * k + i] * x[m * k + i];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) out[m * out_stride + r] = hsum_avx2(acc[r][m]) + tail[r][m];
}

template <int ROWS, int M>
void float_block_scalar(const float* x, int64_t k, const float* w, float* out, int64_t out_stride) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += w[r * k + i] * x[m * k + i];
      out[m * out_stride + r] = s;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Int8 weights: multiplied as integers. Each activation row is rounded to int16 with its own scale
// (absmax / 32767: a relative step of 3e-5 of the row's largest value, finer than bfloat16's 8 bits), so one
// `madd` multiplies 32 (AVX-512) or 16 (AVX2) int8 weights widened to int16 and adds pairs into int32 lanes:
// 2-3 instructions for what took 3 per 16 weights through float32 (measured compute-bound at ~5 GB/s).
// A lane then holds at most K/32 (K/16) pair sums of |127 * 32767| each; the lanes are folded into float
// every kIntChunk columns so they cannot overflow int32 whatever K is.

constexpr int64_t kIntChunk = 4096;

// One int16 multiply-add step: VNNI's vpdpwssd fuses the multiply-add and the accumulation.
template <bool VNNI>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m512i dot_step_avx512(__m512i acc,
                                                                                            __m512i w,
                                                                                            __m512i x) {
  if constexpr (VNNI) return _mm512_dpwssd_epi32(acc, w, x);
  else return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
}

template <int ROWS, int M, bool VNNI>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int8_block_avx512(const int16_t* x, int64_t k,
                                                                         const int8_t* w, float* out,
                                                                         int64_t out_stride) {
  float total[ROWS][M] = {};
  const int8_t* next = w + ROWS * k;
  for (int64_t c0 = 0; c0 < k; c0 += kIntChunk) {
    const int64_t c1 = std::min(k, c0 + kIntChunk);
    __m512i acc[ROWS][M];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_si512();
    int64_t i = c0;
    for (; i + 32 <= c1; i += 32) {
      __m512i wv[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + i)));
        if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * k + i);
        for (int r = 0; r < ROWS; ++r) acc[r][m] = dot_step_avx512<VNNI>(acc[r][m], wv[r], xv);
      }
    }
    if (i < c1) {
      const __mmask32 tail = static_cast<__mmask32>((1ull << (c1 - i)) - 1);
      __m512i wv[ROWS];
      for (int r = 0; r < ROWS; ++r) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(tail, w + r * k + i));
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(tail, x + m * k + i);
        for (int r = 0; r < ROWS; ++r) acc[r][m] = dot_step_avx512<VNNI>(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) total[r][m] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r][m]));
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) out[m * out_stride + r] = total[r][m];
}

template <int ROWS, int M>
__attribute__((target("avx2,fma"))) void int8_block_avx2(const int16_t* x, int64_t k, const int8_t* w,
                                                         float* out, int64_t out_stride) {
  float total[ROWS][M] = {};
  const int8_t* next = w + ROWS * k;
  for (int64_t c0 = 0; c0 < k; c0 += kIntChunk) {
    const int64_t c1 = std::min(k, c0 + kIntChunk);
    __m256i acc[ROWS][M];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_si256();
    int64_t i = c0;
    for (; i + 16 <= c1; i += 16) {
      __m256i wv[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k + i)));
        if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * k + i));
        for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) {
        float tail = 0.f;
        for (int64_t j = i; j < c1; ++j) tail += static_cast<float>(w[r * k + j]) * static_cast<float>(x[m * k + j]);
        total[r][m] += hsum_avx2(_mm256_cvtepi32_ps(acc[r][m])) + tail;
      }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) out[m * out_stride + r] = total[r][m];
}

template <int ROWS, int M>
void int8_block_scalar(const int16_t* x, int64_t k, const int8_t* w, float* out, int64_t out_stride) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) {
      int64_t s = 0;
      for (int64_t i = 0; i < k; ++i) s += static_cast<int64_t>(w[r * k + i]) * x[m * k + i];
      out[m * out_stride + r] = static_cast<float>(s);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch: 4 weight rows a block for one activation row (4 streams of loads in flight), 2 for more rows (so
// ROWS x M accumulators fit the 32 AVX-512 or 16 AVX2 registers), at most `max_rows_per_pass` rows a pass.

template <typename X, typename W>
using BlockFn = void (*)(const X*, int64_t, const W*, float*, int64_t);

template <typename X, typename W, int ROWS, int M>
BlockFn<X, W> pick(Isa isa) {
  if constexpr (std::is_same_v<W, float>) {
    if (isa >= Isa::avx512) return &float_block_avx512<ROWS, M>;
    if (isa == Isa::avx2) return &float_block_avx2<ROWS, M>;
    return &float_block_scalar<ROWS, M>;
  } else {
    if (isa == Isa::avx512_vnni) return &int8_block_avx512<ROWS, M, true>;
    if (isa == Isa::avx512) return &int8_block_avx512<ROWS, M, false>;
    if (isa == Isa::avx2) return &int8_block_avx2<ROWS, M>;
    return &int8_block_scalar<ROWS, M>;
  }
}

template <typename X, typename W, int ROWS>
BlockFn<X, W> pick_rows(Isa isa, int m) {
  switch (m) {
    case 1: return pick<X, W, ROWS, 1>(isa);
    case 2: return pick<X, W, ROWS, 2>(isa);
    case 3: return pick<X, W, ROWS, 3>(isa);
    case 4: return pick<X, W, ROWS, 4>(isa);
    case 5: return pick<X, W, ROWS, 5>(isa);
    case 6: return pick<X, W, ROWS, 6>(isa);
    case 7: return pick<X, W, ROWS, 7>(isa);
    default: return pick<X, W, ROWS, 8>(isa);
  }
}

int max_rows_per_pass(Isa isa) { return isa == Isa::avx2 ? 4 : kMaxRows; }

// y (M x N, float32) = x w^T for output columns [n0, n1) (weight rows), unscaled. The weight block is the
// outer loop: with more activation rows than one pass holds, the later passes read the block from L1.
template <typename X, typename W>
void product_range(Isa isa, const X* x, int64_t m_rows, int64_t k, const W* w, float* y, int64_t n, int64_t n0,
                   int64_t n1) {
  int64_t r = n0;
  if (m_rows == 1) {
    constexpr int R = 4;
    const BlockFn<X, W> block = pick<X, W, R, 1>(isa);
    for (; r + R <= n1; r += R) block(x, k, w + r * k, y + r, n);
  }
  const int per_pass = max_rows_per_pass(isa);
  constexpr int R = 2;
  struct Pass {
    int64_t first;
    BlockFn<X, W> block, one;
  };
  std::vector<Pass> passes;
  for (int64_t m = 0; m < m_rows; m += per_pass) {
    const int rows = static_cast<int>(std::min<int64_t>(per_pass, m_rows - m));
    passes.push_back({m, pick_rows<X, W, R>(isa, rows), pick_rows<X, W, 1>(isa, rows)});
  }
  for (; r + R <= n1; r += R)
    for (const Pass& p : passes) p.block(x + p.first * k, k, w + r * k, y + p.first * n + r, n);
  for (; r < n1; ++r)
    for (const Pass& p : passes) p.one(x + p.first * k, k, w + r * k, y + p.first * n + r, n);
}

// Output columns a thread takes at least: short products stay on one thread.
constexpr int64_t kGrain = 256;

void check_inputs(const at::Tensor& x, const at::Tensor& w, c10::ScalarType weight_type, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, " runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, op, " takes x (rows, in) and w (out, in)");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " columns but w has ", w.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16");
  TORCH_CHECK(w.scalar_type() == weight_type, op, ": w must be ", weight_type, ", not ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
}

at::Tensor finish(at::Tensor y, const c10::optional<at::Tensor>& bias, c10::ScalarType out_type) {
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return out_type == at::kFloat ? y : y.to(out_type);
}

at::Tensor linear_float(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_inputs(x_in, w, at::kFloat, "linear_float");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m_rows = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor y = at::empty({m_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Isa isa = active_isa();
  at::parallel_for(0, n, kGrain, [&](int64_t n0, int64_t n1) {
    product_range<float, float>(isa, xp, m_rows, k, wp, yp, n, n0, n1);
  });
  return finish(y, bias, x_in.scalar_type());
}

at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check_inputs(x_in, w, at::kChar, "linear_int8");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.is_contiguous(),
              "linear_int8 needs one scale per weight row (contiguous)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16,
              "linear_int8: scales must be float32 or bfloat16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m_rows = x.size(0), k = x.size(1), n = w.size(0);
  // Each activation row to int16 with its own scale.
  std::vector<int16_t> xq(static_cast<size_t>(m_rows * k));
  std::vector<float> x_scale(static_cast<size_t>(m_rows));
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < m_rows; ++m) {
    float absmax = 0.f;
    for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(xp[m * k + i]));
    if (!std::isfinite(absmax)) {
      x_scale[m] = std::numeric_limits<float>::quiet_NaN();  // a non-finite activation gives a NaN row, as float would
      continue;
    }
    const float inv = absmax > 0.f ? 32767.f / absmax : 0.f;
    x_scale[m] = absmax / 32767.f;
    for (int64_t i = 0; i < k; ++i) xq[m * k + i] = static_cast<int16_t>(std::nearbyint(xp[m * k + i] * inv));
  }
  at::Tensor y = at::empty({m_rows, n}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const Isa isa = active_isa();
  const bool bf16_scales = scales.scalar_type() == at::kBFloat16;
  const float* sp = bf16_scales ? nullptr : scales.data_ptr<float>();
  const c10::BFloat16* sp16 = bf16_scales ? scales.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, n, kGrain, [&](int64_t n0, int64_t n1) {
    product_range<int16_t, int8_t>(isa, xq.data(), m_rows, k, wp, yp, n, n0, n1);
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t j = n0; j < n1; ++j)
        yp[m * n + j] *= x_scale[m] * (bf16_scales ? static_cast<float>(sp16[j]) : sp[j]);
  });
  return finish(y, bias, x_in.scalar_type());
}

// Shapes only, for torch.compile's tracing.
at::Tensor linear_float_meta(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>&) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

at::Tensor linear_int8_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor&,
                            const c10::optional<at::Tensor>&) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

std::string isa_name() {
  switch (active_isa()) {
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY(murmur_cpu, m) {
  m.def("linear_float(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("isa() -> str", &isa_name);
}

TORCH_LIBRARY_IMPL(murmur_cpu, CPU, m) {
  m.impl("linear_float", &linear_float);
  m.impl("linear_int8", &linear_int8);
}

TORCH_LIBRARY_IMPL(murmur_cpu, Meta, m) {
  m.impl("linear_float", &linear_float_meta);
  m.impl("linear_int8", &linear_int8_meta);
}
