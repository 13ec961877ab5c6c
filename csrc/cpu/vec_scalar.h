// One fp32 lane: the portable variant, and the tail of every vector variant.
#pragma once

#include <cmath>

#include "../common/convert.h"
#include "../common/macros.h"
#include "../common/precision.h"

namespace fusedoptim {

struct VecScalar {
  static constexpr int kWidth = 1;
  float x;
  VecScalar() = default;
  explicit VecScalar(float v) : x(v) {}

  static VecScalar load(const float* p) { return VecScalar(*p); }
  static VecScalar load(const bf16_t* p) { return VecScalar(bf16_to_float(p->bits)); }
  static VecScalar load(const f16_t* p) { return VecScalar(f16_to_float(p->bits)); }
  void store(float* p) const { *p = x; }
  void store(bf16_t* p) const { p->bits = float_to_bf16(x); }
  void store(f16_t* p) const { p->bits = float_to_f16(x); }
  // Stochastic rounding of element `lo` (low word of its index) under key_hi.
  __attribute__((always_inline)) void store_sr(bf16_t* p, uint32_t key_hi, uint32_t lo) const { p->bits = float_to_bf16_sr(x, sr_bits(key_hi, lo)); }
};

namespace lane {
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline float div(float a, float b) { return a / b; }
}  // namespace lane

FO_VEC_ARITH(inline, VecScalar, lane::add, lane::sub, lane::mul, lane::div, std::sqrt, std::fma)
inline VecScalar neg(VecScalar a) { return VecScalar(bits_float(float_bits(a.x) ^ 0x80000000u)); }
inline VecScalar max_nan(VecScalar a, VecScalar b) {
  return std::isnan(a.x) ? a : (a.x > b.x ? a : b);
}

}  // namespace fusedoptim
