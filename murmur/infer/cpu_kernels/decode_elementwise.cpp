// The element-wise work between a decode step's products, one call where PyTorch took several.
//
// At one row PyTorch's RMSNorm on CPU is ~40 us (aten::rms_norm runs as pow, mean, add, rsqrt, mul and
// casts) for 576 numbers, and SmolLM2 runs 61 of them a token: ~2.5 ms of a 20 ms int8 step, more than the
// whole attention (docs/journal.md). These loops take a microsecond or two. Each computes what the model's
// modules compute, in the same dtype steps (float32 statistics, one rounding where the model rounds), so
// only the order of a sum differs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
inline T store(float v) {
  return static_cast<T>(v);  // c10::BFloat16 rounds to nearest even, as PyTorch's casts do
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, " runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, " takes a contiguous (rows, dim) tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), op,
              ": the weight must be (dim,) with dim = ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": the weight must have x's dtype");
}

// The model's RMSNorm: weight * to(x.dtype)(x * rsqrt(mean(x^2) + eps)), statistics in float32.
template <typename T>
void norm_row(const T* x, const T* w, T* out, int64_t dim, double eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < dim; ++i) {
    const float v = load(x, i);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
  for (int64_t i = 0; i < dim; ++i) {
    const float normed = static_cast<float>(store<T>(load(x, i) * inv));  // the model rounds here...
    out[i] = store<T>(load(w, i) * normed);                             // ...and after the weight
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    for (int64_t r = 0; r < rows; ++r)
      norm_row(x.data_ptr<scalar_t>() + r * dim, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + r * dim,
               dim, eps);
  });
  return out;
}

// The residual stream's step: x += delta (in place, rounded to x's dtype as `x + delta` is), then the norm
// of the new x for the next sublayer.
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "add_rms_norm_");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type() && delta.is_contiguous(),
              "add_rms_norm_: delta must be a contiguous tensor of x's shape and dtype");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows * dim; ++i) xp[i] = store<scalar_t>(load(xp, i) + load(dp, i));
    for (int64_t r = 0; r < rows; ++r)
      norm_row(xp + r * dim, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + r * dim, dim, eps);
  });
  return out;
}

// SwiGLU's middle: silu(gate) * up from the packed (rows, 2 * hidden) gate/up product. PyTorch's own
// vectorised silu and mul, called from here (a C++ call costs ~1 us, a Python one several), so the numbers are
// bitwise those of `F.silu(gate).mul_(up)`.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul takes a (rows, 2 * hidden) tensor on CPU");
  const int64_t hidden = gate_up.size(1) / 2;
  return at::silu(gate_up.narrow(1, 0, hidden)).mul_(gate_up.narrow(1, hidden, hidden));
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) { return at::empty_like(x); }

at::Tensor add_rms_norm_meta(at::Tensor& x, const at::Tensor&, const at::Tensor&, double) {
  return at::empty_like(x);
}

at::Tensor silu_mul_meta(const at::Tensor& gate_up) {
  return at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(murmur_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(murmur_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_mul", &silu_mul);
}

TORCH_LIBRARY_IMPL(murmur_cpu, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("add_rms_norm_", &add_rms_norm_meta);
  m.impl("silu_mul", &silu_mul_meta);
}
