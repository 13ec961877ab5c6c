// Scalar conversions between fp32 and the 16-bit storage formats.
//
// Both round to nearest even. They are the reference that the vector
// variants must match bit for bit (see Note [one source of math]):
//  - bf16: NaN becomes 0x7FC0 as in torch's c10::BFloat16; everything else,
//    subnormals included, is rounded, never flushed.
//  - fp16: the semantics of the x86 F16C instructions (VCVTPS2PH with
//    round-to-nearest-even, VCVTPH2PS): subnormals are kept, overflow gives
//    inf, NaN stays NaN with its payload truncated and the quiet bit set.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "macros.h"

namespace fusedoptim {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// The bits of a 32-bit value as another 32-bit type (float <-> uint32_t).
template <class To, class From>
FO_HD To bits_as(From x) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "32-bit values only");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<To, float>) {
    return __uint_as_float(x);
  } else {
    return __float_as_uint(x);
  }
#else
  To t;
  std::memcpy(&t, &x, sizeof t);
  return t;
#endif
}

FO_HD uint32_t float_bits(float f) { return bits_as<uint32_t>(f); }
FO_HD float bits_float(uint32_t u) { return bits_as<float>(u); }

FO_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

FO_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FO_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) {  // inf or NaN (quieted, payload kept)
    return bits_float(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  }
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    return bits_float(sign | float_bits(float(mant) * 5.9604644775390625e-08f));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

FO_HD uint16_t float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf
  if (a < 0x38800000u) {
    // Subnormal or zero in fp16: scale to units of 2^-24 (exact) and round
    // to an integer with the fp32 adder's own round-to-nearest-even.
    const float scaled = bits_float(a) * 16777216.0f;
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;
    return uint16_t(sign | uint16_t(rounded));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((r - (112u << 23)) >> 13));
}

}  // namespace fusedoptim
