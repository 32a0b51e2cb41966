// One decode step's attention for a layer, in one call: rotate the new queries and keys (rope), write the new
// keys and values into the KV cache, and attend each row to its cache up to its own position.
//
// PyTorch did this in ~10 ops a layer (rope's products and roll, the cache's index_copy_, SDPA with a mask),
// and its flash-attention kernel alone cost 40 us at one row and 165 us at 8 rows of SmolLM2 (9 heads, 64-wide,
// 60 positions) for a fraction of a megaflop: setup, not arithmetic (docs/journal.md). Here the rows x heads
// are split over threads and each (row, head) is two short vectorised loops.
//
// Numbers follow the model's own steps: rope as `x * cos + rotate_half(x) * sin` with each product rounded to
// the dtype and then their sum (as the eager ops round), scores and softmax in float32, the output rounded once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

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
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> q(head_dim), acc(head_dim), scores;
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / heads, h = item % heads, g = h / group, length = positions[b] + 1;
      const T* query = qkv + b * width + h * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) q[i] = as_float(query[i]) * scale;
      scores.resize(length);
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < length; ++j) {
        const T* key = cache_row(0, b, g, j);
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < head_dim; ++i) dot += q[i] * as_float(key[i]);
        scores[j] = dot;
        best = std::max(best, dot);
      }
      float total = 0.f;
      for (int64_t j = 0; j < length; ++j) {
        scores[j] = std::exp(scores[j] - best);
        total += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < length; ++j) {
        const T* value = cache_row(1, b, g, j);
        const float p = scores[j];
#pragma omp simd
        for (int64_t i = 0; i < head_dim; ++i) acc[i] += p * as_float(value[i]);
      }
      T* o = out + (b * heads + h) * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) o[i] = round_to<T>(acc[i] / total);
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
