// Which instruction set Murmur's CPU kernels use here, chosen once per process from what the CPU has and
// capped by ATEN_CPU_CAPABILITY ("avx2" or "default"), the variable that caps PyTorch's own kernels, so
// emulating a laptop's CPU slows Murmur's kernels and PyTorch's alike; and the one helper every AVX2 kernel
// shares (AVX-512 has `_mm512_reduce_add_ps`).
#pragma once

#include <immintrin.h>

#include <cstdlib>
#include <string>

namespace murmur_cpu {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_vnni = 3 };

inline Isa detect_isa() {
  __builtin_cpu_init();
  Isa best = Isa::scalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = __builtin_cpu_supports("avx512vnni") ? Isa::avx512_vnni : Isa::avx512;
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap != nullptr) {
    const std::string c(cap);
    if (c == "default") best = Isa::scalar;
    else if (c == "avx2" && best >= Isa::avx512) best = Isa::avx2;
  }
  return best;
}

inline Isa active_isa() {
  static const Isa isa = detect_isa();  // one instance across the library's sources (inline function)
  return isa;
}

// The sum of an AVX register's 8 floats.
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace murmur_cpu
