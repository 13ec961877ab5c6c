// 8-bit block-quantized optimizer states: the format, written once.
//
// Note [8-bit states]
// With state_bits=8, each moment of a tensor with at least
// min_quantized_numel elements is kept as one uint8 code per element plus
// one fp32 scale per block of B elements (state_block_size, a power of two
// from 64 to 4096; 256 by default). Block j holds elements [j*B, (j+1)*B)
// of the tensor flattened in memory order; the last block may be shorter.
// Adam with B = 256 keeps 2 + 8/256 = 2.03 bytes of state per element.
//
// Two code maps, both small floating-point grids normalised to [0, 1]:
//
//   signed    exp_avg, momentum_buffer: the value itself.
//             code = s*128 + e*8 + f     (s, e, f: 1, 4 and 3 bits)
//             |q| = e == 0 ? f * 2^-17 : 2^(e-15) * (1 + f/8)
//             q = s ? -|q| : |q|
//   unsigned  exp_avg_sq: its square root r = sqrt(v), so that the grid's
//             range of 2^18 covers 2^36 of v, and a v far below its block's
//             largest stays nonzero as long as its exp_avg does.
//             code = e*16 + f            (e, f: 4 and 4 bits)
//             q = e == 0 ? f * 2^-18 : 2^(e-15) * (1 + f/16)
//
// Codes with e = 15 and f > 0 (grid values above 1) are never written.
// Every grid value is an fp16 value: a magnitude code's e and f are the
// exponent field and the top mantissa bits of an fp16 (e = 0: subnormal),
// which is how the vector variants decode them (F16C, exactly).
//
// Dequantizing (fp32 operations, each rounded to nearest even):
//   signed    x = q(code) * scale
//   unsigned  r = q(code) * scale;  v = r * r
//
// Quantizing a block of fp32 values x (the moments after the update; for
// exp_avg_sq, r = sqrt(v) rounded to fp32):
//   scale = max |x| over the block (NaN if any x is NaN; then the quiet
//           NaN 0x7FC00000, whatever the payload)
//   if scale is 0, infinite or NaN: every code of the block is 0 (such a
//           block dequantizes to zeros, or to NaN throughout: a nonfinite
//           moment poisons its block, not only its element)
//   else    inv = 1 / scale;  n = |x| * inv    (fp32, so n <= 1 + 2^-23)
//           signed: the magnitude code is the grid value nearest to n, a
//           tie going to the even code; the sign bit is x's sign bit (so
//           -0.0 is code 128)
//           unsigned: n is rounded at random to one of the two grid values
//           around it (below)
//
// In the kernels the nearest grid value comes from the fp32 bits of n:
// above the grid's smallest normal value (2^-14) the mantissa is rounded to
// 3 bits, nearest even, carrying into the exponent; below it the code is
// n * 2^17 rounded to the nearest even integer. Both are exact integer or
// fp32 operations, so every CPU variant gives the same codes (the AVX2
// lanes reach the same codes by one rounded fp32 addition; see
// Q8Lanes::codes8 in cpu/quant8_vec.h).
//
// Why the second moment rounds at random: exp_avg_sq moves by (1 - beta2)
// of its distance to g^2 per step, 0.1% with torch's beta2, while the
// unsigned grid's spacing is 3-6% of r. Rounded to nearest, an element
// whose v should grow or shrink relative to its block's largest stays on
// its code (only the exact block maximum moves), and the bias correction
// then divides a stale v by a growing 1 - beta2^t: on the MLP of
// bench/precision_quality.py the stored v fell to a median 0.19x of the
// fp32 run's after 3000 steps and Adam's updates grew 35%. Rounded up with
// probability equal to n's distance from the lower grid value (in units of
// the spacing), each step's small change survives in expectation, and the
// run tracks fp32 states. The first moment (beta1 = 0.9: 10% a step) and
// the momentum buffer round to nearest.
//
// The random bits are a hash of the value itself and its place in the
// block, so they need no seed, step or tensor id and are the same in every
// variant and device; they change whenever n does, which is what matters
// for a moment that changes a little every step. One multiplication by
// 2^32 / golden ratio (Fibonacci hashing: its top bits move by an
// irrational fraction of their range per unit of the input) adds 5-10%
// to an 8-bit Adam step on one core, about half of what precision.h's full
// mix32 added, with the same training results:
//   u = ((bits(n) ^ (k * 0x85EBCA6B)) * 0x9E3779B9 mod 2^32) >> 16
//                                                   (k: index in the block)
//   t = bits(n)                             if n >= 2^-14
//       bits(n + 2^-14) (fp32 addition)     below (the e = 1 binade has the
//                                           subnormal grid's spacing)
//   code = ((t + u * 8) >> 19) - 112 * 16   (- 113 * 16 below 2^-14)
// that is, the 19 bits of t below the grid's spacing plus 16 random bits
// shifted to their top decide the carry: a value on the grid keeps its
// code, one between goes up with probability within 2^-16 of its distance
// from the lower value. n <= 1 + 2^-23 never carries past code 240 (1.0).
//
// One step of a block: dequantize its states, run adam_update / sgd_update
// (update_math.h) on them as on fp32 states (Adam with its bias correction
// folded into eps and the step size: Note [folded bias correction]), store
// the param, then quantize the new moments. The block's values stay on the
// stack (a few KB, in L1) between the three passes; each block is updated by
// one thread.
#pragma once

#include <cstdint>

#include "convert.h"
#include "macros.h"

namespace fusedoptim {

constexpr int kQ8MinBlock = 64;
constexpr int kQ8MaxBlock = 4096;
inline bool q8_block_ok(int64_t b) { return b >= kQ8MinBlock && b <= kQ8MaxBlock && (b & (b - 1)) == 0; }
inline int64_t q8_blocks(int64_t numel, int64_t block) { return (numel + block - 1) / block; }

// a where take_a, else b, without a branch (so that the block loops vectorize).
FO_HD_ALWAYS uint32_t q8_select(bool take_a, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(take_a);
  return (a & mask) | (b & ~mask);
}

// The grid value of a magnitude code with `mbits` mantissa bits, before
// scaling. a reads the code as if e were a normal exponent: 2^(e-15) *
// (1 + f/2^mbits). For e = 0 that is 2^-15 + f * 2^-(15+mbits), and the
// grid value f * 2^-(14+mbits) is 2a - 2^-14, which is then below a; for
// e >= 1, 2a - 2^-14 >= a. Both are exact, so q = min(a, 2a - 2^-14)
// without a branch or a select, in every variant alike.
template <int kMantBits>
FO_HD_ALWAYS float q8_grid_value(uint32_t mag) {
  const float a = bits_float((mag + (112u << kMantBits)) << (23 - kMantBits));
  const float b = (a + a) - 6.103515625e-05f;  // 2^-14
  return b < a ? b : a;
}

// The grid value of a signed code (before scaling).
FO_HD_ALWAYS float q8_signed_value(uint32_t c) {
  return bits_float(float_bits(q8_grid_value<3>(c & 0x7fu)) | ((c & 0x80u) << 24));
}

// The grid value of an unsigned code (before scaling).
FO_HD_ALWAYS float q8_unsigned_value(uint32_t c) { return q8_grid_value<4>(c); }

// y rounded to the nearest integer, ties to even, for 0 <= y <= 2^22.
FO_HD_ALWAYS uint32_t q8_rint(float y) { return uint32_t(int32_t((y + 8388608.0f) - 8388608.0f)); }

// The signed magnitude code of n in [0, 1 + 2^-23]: nearest grid value, ties to even.
FO_HD_ALWAYS uint32_t q8_signed_mag(float n) {
  const uint32_t b = float_bits(n);
  const uint32_t normal = ((b + 0x7ffffu + ((b >> 20) & 1u)) >> 20) - (112u << 3);
  const uint32_t sub = q8_rint(n * 131072.0f);  // 2^17
  return q8_select(n < 6.103515625e-05f, sub, normal);  // 2^-14
}

// The 16 random bits of the unsigned code of n at index k of its block.
FO_HD_ALWAYS uint32_t q8_dither(float n, uint32_t k) { return ((float_bits(n) ^ (k * 0x85ebca6bu)) * 0x9e3779b9u) >> 16; }

// The unsigned code of n in [0, 1 + 2^-23] at index k of its block: one of
// the two grid values around n, at random (Note [8-bit states]).
FO_HD_ALWAYS uint32_t q8_unsigned_code(float n, uint32_t k) {
  const bool sub = n < 6.103515625e-05f;  // 2^-14
  const uint32_t t = float_bits(sub ? n + 6.103515625e-05f : n);
  return ((t + (q8_dither(n, k) << 3)) >> 19) - (sub ? (113u << 4) : (112u << 4));
}

// The code of x at index k of a block whose scale has the reciprocal inv.
template <bool kSigned>
FO_HD_ALWAYS uint8_t q8_code(float x, float inv, uint32_t k) {
  const uint32_t xb = float_bits(x);
  const float mag = bits_float(xb & 0x7fffffffu) * inv;
  if constexpr (kSigned) {
    return uint8_t(q8_signed_mag(mag) | ((xb >> 24) & 0x80u));
  } else {
    return uint8_t(q8_unsigned_code(mag, k));
  }
}

// |x| as fp32 bits: their integer maximum orders NaN above +inf above every
// finite value, in any order of the elements.
FO_HD_ALWAYS uint32_t q8_abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// The scale a block stores for the maximum `mb` of its q8_abs_bits, and
// whether its codes are computed (false: all zero).
FO_HD_ALWAYS float q8_scale(uint32_t mb, bool* encode) {
  *encode = mb != 0 && mb < 0x7f800000u;
  return bits_float(mb > 0x7f800000u ? 0x7fc00000u : mb);
}

// Quantizes x[0, n) (one block) into codes and returns its scale.
template <bool kSigned>
FO_HD_ALWAYS float q8_quantize_block(const float* x, int64_t n, uint8_t* codes) {
  uint32_t mb = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t a = q8_abs_bits(x[k]);
    mb = a > mb ? a : mb;
  }
  bool encode;
  const float scale = q8_scale(mb, &encode);
  const float inv = encode ? 1.0f / scale : 0.0f;
  for (int64_t k = 0; k < n; ++k) codes[k] = encode ? q8_code<kSigned>(x[k], inv, uint32_t(k)) : uint8_t(0);
  return scale;
}

// Dequantizes one block: signed codes to values, unsigned codes to v = r * r.
template <bool kSigned>
FO_HD_ALWAYS void q8_dequantize_block(const uint8_t* codes, float scale, int64_t n, float* x) {
  for (int64_t k = 0; k < n; ++k) {
    if constexpr (kSigned) {
      x[k] = q8_signed_value(codes[k]) * scale;
    } else {
      const float r = q8_unsigned_value(codes[k]) * scale;
      x[k] = r * r;
    }
  }
}

}  // namespace fusedoptim
