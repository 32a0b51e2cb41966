// One decode step's attention for a layer, in one call: rotate the new queries and keys (rope), write the new
// keys and values into the KV cache, and attend each row to its cache up to its own position.
//
// PyTorch did this in ~10 ops a layer (rope's products and roll, the cache's index_copy_, SDPA with a mask),
// and its flash-attention kernel alone cost 40 us at one row and 165 us at 8 rows of SmolLM2 (9 heads, 64-wide,
// 60 positions) for a fraction of a megaflop: setup, not arithmetic (docs/journal.md). Here the rows x kv heads
// are split over threads, and each is a few short vectorised loops (AVX-512, AVX2 or plain, as cpu_isa.h picks).
//
// Numbers follow the model's own steps: rope as `x * cos + rotate_half(x) * sin` with each product rounded to
// the dtype and then their sum (as the eager ops round), scores and softmax in float32, the output rounded once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using murmur_cpu::hsum_avx2;

template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

// x (head_dim values) rotated in place: x * cos + roll(x, half) * sin_signed, where sin_signed is
// (-sin, sin) as PackedDecoder builds it, cos and sin_signed already in the dtype.
template <typename T>
void rotate(T* x, const T* cos, const T* sin_signed, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  float rotated[1024];
  for (int64_t i = 0; i < head_dim; ++i) {
    const float partner = as_float(x[i < half ? i + half : i - half]);
    const float a = as_float(round_to<T>(as_float(x[i]) * as_float(cos[i])));
    const float b = as_float(round_to<T>(partner * as_float(sin_signed[i])));
    rotated[i] = a + b;
  }
  for (int64_t i = 0; i < head_dim; ++i) x[i] = round_to<T>(rotated[i]);
}

// ---------------------------------------------------------------------------------------------------------
// Float loops of the attention, per instruction set: dot products of the query with each key, exp of the
// shifted scores (Cephes' polynomial for 2^f, ~2 ulp), and sums of value rows weighted by them.

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float total = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// scores[j] = dot(q, keys[j]) for `count` consecutive keys of `n` values: 4 keys at a time, so 4 independent
// multiply-add chains and reductions are in flight instead of one.
__attribute__((target("avx512f"))) void scores_avx512(const float* q, const float* keys, int64_t count, int64_t n,
                                                      float* scores) {
  int64_t j = 0;
  if (n % 16 == 0) {
    for (; j + 4 <= count; j += 4) {
      const float* k = keys + j * n;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + i), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + n + i), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + 2 * n + i), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + 3 * n + i), a3);
      }
      scores[j] = _mm512_reduce_add_ps(a0);
      scores[j + 1] = _mm512_reduce_add_ps(a1);
      scores[j + 2] = _mm512_reduce_add_ps(a2);
      scores[j + 3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; j < count; ++j) scores[j] = dot_avx512(q, keys + j * n, n);
}

__attribute__((target("avx512f"))) void axpy_avx512(float alpha, const float* x, float* y, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Cephes' expf: 2^k * p(r) for x = k ln2 + r, |r| <= ln2 / 2, p's coefficients highest first.
constexpr float kExpPolynomial[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// v[i] = exp(v[i] - shift) for v[i] <= shift; returns their sum.
__attribute__((target("avx512f"))) float exp_shifted_avx512(float* v, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift), log2e = _mm512_set1_ps(1.44269504088896341f),
               ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f),
               low = _mm512_set1_ps(-87.0f), one = _mm512_set1_ps(1.f);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(v + i), s), low);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, x));
    __m512 p = _mm512_set1_ps(kExpPolynomial[0]);
    for (int c = 1; c < 6; ++c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPolynomial[c]));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), one);
    const __m512 e = _mm512_scalef_ps(y, k);
    _mm512_storeu_ps(v + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  float total = _mm512_reduce_add_ps(sum);
  for (; i < n; ++i) total += (v[i] = std::exp(v[i] - shift));
  return total;
}

__attribute__((target("avx512f"))) void widen_avx512(const c10::BFloat16* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum_avx2(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const float* keys, int64_t count, int64_t n,
                                                     float* scores) {
  int64_t j = 0;
  if (n % 8 == 0) {
    for (; j + 4 <= count; j += 4) {
      const float* k = keys + j * n;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < n; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + n + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * n + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * n + i), a3);
      }
      scores[j] = hsum_avx2(a0);
      scores[j + 1] = hsum_avx2(a1);
      scores[j + 2] = hsum_avx2(a2);
      scores[j + 3] = hsum_avx2(a3);
    }
  }
  for (; j < count; ++j) scores[j] = dot_avx2(q, keys + j * n, n);
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

__attribute__((target("avx2,fma"))) float exp_shifted_avx2(float* v, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift), log2e = _mm256_set1_ps(1.44269504088896341f),
               ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f),
               low = _mm256_set1_ps(-87.0f), one = _mm256_set1_ps(1.f);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), s), low);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, x));
    __m256 p = _mm256_set1_ps(kExpPolynomial[0]);
    for (int c = 1; c < 6; ++c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPolynomial[c]));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), one);
    // 2^k through the exponent bits: k >= -126 after the clamp, so the bits stay a normal float.
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    _mm256_storeu_ps(v + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum_avx2(sum);
  for (; i < n; ++i) total += (v[i] = std::exp(v[i] - shift));
  return total;
}

__attribute__((target("avx2,fma"))) void widen_avx2(const c10::BFloat16* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

void scores_scalar(const float* q, const float* keys, int64_t count, int64_t n, float* scores) {
  for (int64_t j = 0; j < count; ++j) scores[j] = dot_scalar(q, keys + j * n, n);
}

void axpy_scalar(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

float exp_shifted_scalar(float* v, int64_t n, float shift) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += (v[i] = std::exp(v[i] - shift));
  return total;
}

void widen_scalar(const c10::BFloat16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

struct FloatLoops {
  void (*scores)(const float*, const float*, int64_t, int64_t, float*);
  void (*axpy)(float, const float*, float*, int64_t);
  float (*exp_shifted)(float*, int64_t, float);
  void (*widen)(const c10::BFloat16*, float*, int64_t);
};

FloatLoops float_loops() {
  switch (murmur_cpu::active_isa()) {
    case murmur_cpu::Isa::avx512:
    case murmur_cpu::Isa::avx512_vnni: return {scores_avx512, axpy_avx512, exp_shifted_avx512, widen_avx512};
    case murmur_cpu::Isa::avx2: return {scores_avx2, axpy_avx2, exp_shifted_avx2, widen_avx2};
    default: return {scores_scalar, axpy_scalar, exp_shifted_scalar, widen_scalar};
  }
}

// `count` rows of `head_dim` values from the cache as float32: the cache itself for float32, else widened
// into `buffer`.
inline const float* as_floats(const float* rows, int64_t, std::vector<float>&, const FloatLoops&) { return rows; }

inline const float* as_floats(const c10::BFloat16* rows, int64_t count, std::vector<float>& buffer,
                              const FloatLoops& loops) {
  buffer.resize(count);
  loops.widen(rows, buffer.data(), count);
  return buffer.data();
}

template <typename T>
void attend_rows(T* qkv, const T* cos, const T* sin_signed, T* kv, const int64_t* positions, int64_t batch,
                 int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t slots, int64_t max_len, T* out) {
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  const int64_t group = heads / kv_heads;
  // Cache layout (2, slots, kv_heads, max_len, head_dim): keys then values.
  auto cache_row = [&](int64_t which, int64_t b, int64_t g, int64_t pos) {
    return kv + (((which * slots + b) * kv_heads + g) * max_len + pos) * head_dim;
  };
  for (int64_t b = 0; b < batch; ++b) {
    T* row = qkv + b * width;
    const T* c = cos + b * head_dim;
    const T* s = sin_signed + b * head_dim;
    for (int64_t h = 0; h < heads + kv_heads; ++h) rotate(row + h * head_dim, c, s, head_dim);
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::copy_n(row + (heads + g) * head_dim, head_dim, cache_row(0, b, g, positions[b]));
      std::copy_n(row + (heads + kv_heads + g) * head_dim, head_dim, cache_row(1, b, g, positions[b]));
    }
  }
  const FloatLoops loops = float_loops();
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  // One item per (row, kv head): its keys and values are read (and widened) once for the heads sharing them.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> q(head_dim), acc(head_dim), scores, key_buffer, value_buffer;
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / kv_heads, g = item % kv_heads, length = positions[b] + 1;
      const float* keys = as_floats(cache_row(0, b, g, 0), length * head_dim, key_buffer, loops);
      const float* values = as_floats(cache_row(1, b, g, 0), length * head_dim, value_buffer, loops);
      scores.resize(length);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* query = qkv + b * width + h * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) q[i] = as_float(query[i]) * scale;
        loops.scores(q.data(), keys, length, head_dim, scores.data());
        const float best = *std::max_element(scores.begin(), scores.end());
        const float total = loops.exp_shifted(scores.data(), length, best);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < length; ++j) loops.axpy(scores[j], values + j * head_dim, acc.data(), head_dim);
        T* o = out + (b * heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) o[i] = round_to<T>(acc[i] / total);
      }
    }
  });
}

// qkv: (B, (H + 2 KVH) * D), the packed product's output, rotated in place. cos, sin_signed: (B, D).
// kv: the layer's cache (2, slots, KVH, max_len, D). positions: (B,) int64, each row's new position; row b
// attends to cache positions 0..positions[b]. Returns (B, H * D).
at::Tensor attend_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin_signed, at::Tensor& kv,
                   const at::Tensor& positions, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && kv.device().is_cpu() && positions.device().is_cpu(),
              "attend_ runs on CPU tensors");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "attend_: float32 or bfloat16");
  for (const at::Tensor* t : {&cos, &sin_signed, static_cast<const at::Tensor*>(&kv)})
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->is_contiguous(),
                "attend_: cos, sin and the cache must be contiguous and of qkv's dtype");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "attend_: heads must be a multiple of kv_heads");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.size(2) == kv_heads, "attend_: kv must be (2, slots, ",
              kv_heads, ", max_len, head_dim)");
  const int64_t head_dim = kv.size(4), slots = kv.size(1), max_len = kv.size(3), batch = qkv.size(0);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024, "attend_: head_dim must be even and at most 1024");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * head_dim,
              "attend_: qkv must be a contiguous (rows, (heads + 2 kv_heads) * head_dim) tensor");
  TORCH_CHECK(batch <= slots, "attend_: more rows than cache slots");
  TORCH_CHECK(cos.numel() == batch * head_dim && sin_signed.numel() == batch * head_dim,
              "attend_: cos and sin need head_dim values per row");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == batch && positions.is_contiguous(),
              "attend_: positions must be one int64 per row");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < max_len, "attend_: position ", pos[b], " outside the cache (", max_len, ")");
  at::Tensor out = at::empty({batch, heads * head_dim}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    attend_rows<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin_signed.data_ptr<float>(),
                       kv.data_ptr<float>(), pos, batch, heads, kv_heads, head_dim, slots, max_len,
                       out.data_ptr<float>());
  } else {
    using B = c10::BFloat16;
    attend_rows<B>(qkv.data_ptr<B>(), cos.data_ptr<B>(), sin_signed.data_ptr<B>(), kv.data_ptr<B>(), pos, batch,
                   heads, kv_heads, head_dim, slots, max_len, out.data_ptr<B>());
  }
  return out;
}

at::Tensor attend_meta(at::Tensor& qkv, const at::Tensor&, const at::Tensor&, at::Tensor& kv, const at::Tensor&,
                       int64_t heads, int64_t) {
  return at::empty({qkv.size(0), heads * kv.size(4)}, qkv.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(murmur_cpu, m) {
  m.def("attend_(Tensor(a!) qkv, Tensor cos, Tensor sin_signed, Tensor(b!) kv, Tensor positions, int heads, "
        "int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(murmur_cpu, CPU, m) { m.impl("attend_", &attend_); }

TORCH_LIBRARY_IMPL(murmur_cpu, Meta, m) { m.impl("attend_", &attend_meta); }
