// Note [8-bit states] (common/quant8.h) on the lanes of a CPU variant.
//
// Q8Lanes<V> reads W codes into a V of grid values, keeps a running
// maximum of |x| bits, and writes codes kEncodeWidth at a time; a kernel
// finishes every loop with the one-lane form, which calls the scalar
// functions of quant8.h. Each operation is an exact integer operation or a
// correctly rounded fp32 one, the same in every variant, so the codes and
// the values are the same bits whatever the width.
//
// Included by kernels.cpp only, whose variants are compiled with different
// instruction sets: everything here is static or always inlined, so that no
// variant's copy of a function stands in for another's at link time.
#pragma once

#include <cstdint>

#include "../common/quant8.h"
#include "vec_scalar.h"
#if FUSEDOPTIM_ISA >= 1
#include <immintrin.h>

#include "vec_avx2.h"
#endif
#if FUSEDOPTIM_ISA >= 2
#include "vec_avx512.h"
#endif

namespace fusedoptim {
namespace cpu {
namespace {

template <class V>
struct Q8Lanes;

template <>
struct Q8Lanes<VecScalar> {
  static constexpr int kEncodeWidth = 1;
  using Max = uint32_t;
  static Max zero() { return 0; }
  static VecScalar signed_values(const uint8_t* c) { return VecScalar(q8_signed_value(*c)); }
  static VecScalar unsigned_values(const uint8_t* c) { return VecScalar(q8_unsigned_value(*c)); }
  static Max max_abs(Max m, VecScalar x) {
    const uint32_t a = q8_abs_bits(x.x);
    return a > m ? a : m;
  }
  static uint32_t reduce(Max m) { return m; }
  template <bool kSigned>
  static void encode(const float* x, float inv, uint8_t* codes, uint32_t k) {
    *codes = q8_code<kSigned>(*x, inv, k);
  }
};

#if FUSEDOPTIM_ISA >= 1
// Eight lanes with AVX2.
template <>
struct Q8Lanes<VecAVX2> {
  static constexpr int kEncodeWidth = 32;
  using Max = __m256i;
  static Max zero() { return _mm256_setzero_si256(); }

  // The grid values are fp16 values, so F16C converts them exactly: a
  // magnitude code of e and f (1 + 3 or 4 + 4 bits) has the fp16 bits
  // e << 10 | f << (10 - mantissa bits), whose value is 2^(e-15) * (1 + f/2^b)
  // for e >= 1 and the fp16 subnormal f * 2^-(14+b) for e = 0, the grid's
  // (quant8.h). A signed code's byte, sign-extended to 16 bits and shifted
  // left by 7, has its sign in bits 14 and 15 and its magnitude in 7 .. 13:
  // clearing bit 14 leaves the fp16 bits, -0.0 for code 128.
  static VecAVX2 signed_values(const uint8_t* c) {
    const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    return VecAVX2(_mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(int16_t(0xbf80)))));
  }
  static VecAVX2 unsigned_values(const uint8_t* c) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    return VecAVX2(_mm256_cvtph_ps(_mm_slli_epi16(w, 6)));
  }

  static Max max_abs(Max m, VecAVX2 x) {
    return _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(x.x), _mm256_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce(Max m) {
    __m128i r = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xb1));
    return uint32_t(_mm_cvtsi128_si32(r));
  }

  // q8_code<true> of quant8.h (the signed map) on eight lanes, one code per
  // 32-bit lane, by one fp32 addition instead of quant8.h's two roundings
  // and select. With K = 3 mantissa bits and e = max(exponent field of n,
  // that of 2^-14), M = 2^(e + 23 - K) has an ulp of exactly the grid's
  // spacing around n (2^-14 and below: the subnormal spacing), and
  // n < 2^(e+1) <= M, so n + M, rounded to nearest even, is M plus n's
  // nearest grid step count: its mantissa field is 2^K + f (2^(K+1) where n
  // rounds up to the next binade) above 2^-14, f below. The code is that
  // field plus e's contribution, (e >> (23 - K)) - (113 << K). The same
  // codes as quant8.h for every n in [0, 1 + 2^-23] (checked exhaustively:
  // 1,065,353,218 values, with K = 3 and 4); like q8_rint, the addition
  // rounds as MXCSR says, to nearest even unless a program changed it.
  static __m256i signed8(const float* x, __m256 inv) {
    constexpr int kMant = 3;
    const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256 n = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(xb, _mm256_set1_epi32(0x7fffffff))), inv);
    const __m256i e = _mm256_max_epi32(_mm256_and_si256(_mm256_castps_si256(n), _mm256_set1_epi32(0x7f800000)),
                                       _mm256_set1_epi32(113 << 23));  // 2^-14
    const __m256i m = _mm256_add_epi32(e, _mm256_set1_epi32((23 - kMant) << 23));
    const __m256i steps = _mm256_and_si256(_mm256_castps_si256(_mm256_add_ps(n, _mm256_castsi256_ps(m))),
                                           _mm256_set1_epi32(0x7fffff));
    const __m256i code = _mm256_add_epi32(steps, _mm256_sub_epi32(_mm256_srli_epi32(e, 23 - kMant),
                                                                  _mm256_set1_epi32(113 << kMant)));
    return _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(xb, 24), _mm256_set1_epi32(0x80)));
  }
  // q8_code<false> of quant8.h on eight lanes at block indices k0 .. k0 + 7.
  // x holds square roots, never below +0, so |x| is x. Below 2^-14
  // quant8.h takes the bits of n + 2^-14 and subtracts 113 << 4. The bits
  // of n * 0.5 + 2^-15 (one fma; n * 0.5 is exact for a normal n, and a
  // subnormal n is too small to move the sum's rounding) are those bits
  // less one exponent step (the same value halved, rounded alike), so
  // 112 << 4 serves both ranges. That value is >= n below 2^-14 and <= n
  // from 2^-14 up (n is an fp32 value on the far side of the exact sum,
  // which rounding cannot cross), so the larger of the two is the one to
  // round, without a compare; where they are equal either has the same
  // bits. A compare, a select and two integer operations fewer than
  // quant8.h's form: the AVX2 8-bit AdamW step 4% faster on one Xeon core.
  static __m256i unsigned8(const float* x, __m256 inv, __m256i key) {
    const __m256 n = _mm256_mul_ps(_mm256_loadu_ps(x), inv);
    const __m256i h = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_castps_si256(n), key),
                                         _mm256_set1_epi32(int(0x9e3779b9u)));
    const __m256i u8 = _mm256_and_si256(_mm256_srli_epi32(h, 13), _mm256_set1_epi32(0x7fff8));  // (h >> 16) << 3
    const __m256 t = _mm256_max_ps(n, _mm256_fmadd_ps(n, _mm256_set1_ps(0.5f), _mm256_set1_ps(3.0517578125e-05f)));
    const __m256i code = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), u8), 19);
    return _mm256_sub_epi32(code, _mm256_set1_epi32(112 << 4));
  }
  // The dither keys k * 0x85EBCA6B of block indices k0 .. k0 + 7.
  static __m256i keys8(uint32_t k0) {
    const __m256i lanes = _mm256_setr_epi32(0, int(0x85ebca6bu), int(2 * 0x85ebca6bu), int(3 * 0x85ebca6bu),
                                            int(4 * 0x85ebca6bu), int(5 * 0x85ebca6bu), int(6 * 0x85ebca6bu),
                                            int(7 * 0x85ebca6bu));
    return _mm256_add_epi32(_mm256_set1_epi32(int(k0 * 0x85ebca6bu)), lanes);
  }
  template <bool kSigned>
  static __m256i codes8(const float* x, __m256 inv, __m256i key) {
    if constexpr (kSigned) {
      return signed8(x, inv);
    } else {
      return unsigned8(x, inv, key);
    }
  }
  // 32 codes: three packs put them in the order 0-3 8-11 16-19 24-27 4-7 ...,
  // one permute of 32-bit groups restores it.
  template <bool kSigned>
  static void encode(const float* x, float inv, uint8_t* codes, uint32_t k) {
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i key[4] = {};
    if constexpr (!kSigned) {
      key[0] = keys8(k);
      const __m256i step = _mm256_set1_epi32(int(8 * 0x85ebca6bu));
      for (int j = 1; j < 4; ++j) key[j] = _mm256_add_epi32(key[j - 1], step);
    }
    const __m256i ab = _mm256_packus_epi32(codes8<kSigned>(x, vinv, key[0]), codes8<kSigned>(x + 8, vinv, key[1]));
    const __m256i cd = _mm256_packus_epi32(codes8<kSigned>(x + 16, vinv, key[2]), codes8<kSigned>(x + 24, vinv, key[3]));
    const __m256i bytes = _mm256_packus_epi16(ab, cd);
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), ordered);
  }
};
#endif

#if FUSEDOPTIM_ISA >= 2
// Sixteen lanes with AVX-512: Q8Lanes<VecAVX2>'s operations, twice as wide.
template <>
struct Q8Lanes<VecAVX512> {
  static constexpr int kEncodeWidth = 64;
  using Max = __m512i;
  static Max zero() { return _mm512_setzero_si512(); }

  // The grid values through F16C, exactly (see Q8Lanes<VecAVX2>).
  static VecAVX512 signed_values(const uint8_t* c) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    return VecAVX512(_mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(int16_t(0xbf80)))));
  }
  static VecAVX512 unsigned_values(const uint8_t* c) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    return VecAVX512(_mm512_cvtph_ps(_mm256_slli_epi16(w, 6)));
  }

  static Max max_abs(Max m, VecAVX512 x) {
    return _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(x.x), _mm512_set1_epi32(0x7fffffff)));
  }
  static uint32_t reduce(Max m) { return _mm512_reduce_max_epu32(m); }

  // Q8Lanes<VecAVX2>::signed8 on sixteen lanes.
  static __m512i signed16(const float* x, __m512 inv) {
    constexpr int kMant = 3;
    const __m512i xb = _mm512_loadu_si512(x);
    const __m512 n = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(xb, _mm512_set1_epi32(0x7fffffff))), inv);
    const __m512i e = _mm512_max_epi32(_mm512_and_si512(_mm512_castps_si512(n), _mm512_set1_epi32(0x7f800000)),
                                       _mm512_set1_epi32(113 << 23));  // 2^-14
    const __m512i m = _mm512_add_epi32(e, _mm512_set1_epi32((23 - kMant) << 23));
    const __m512i steps = _mm512_and_si512(_mm512_castps_si512(_mm512_add_ps(n, _mm512_castsi512_ps(m))),
                                           _mm512_set1_epi32(0x7fffff));
    const __m512i code = _mm512_add_epi32(steps, _mm512_sub_epi32(_mm512_srli_epi32(e, 23 - kMant),
                                                                  _mm512_set1_epi32(113 << kMant)));
    return _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(xb, 24), _mm512_set1_epi32(0x80)));
  }
  // Q8Lanes<VecAVX2>::unsigned8 on sixteen lanes, with the dither keys of
  // their block indices.
  static __m512i unsigned16(const float* x, __m512 inv, __m512i key) {
    const __m512 n = _mm512_mul_ps(_mm512_loadu_ps(x), inv);
    const __m512i h = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_castps_si512(n), key), _mm512_set1_epi32(int(0x9e3779b9u)));
    const __m512i u8 = _mm512_and_si512(_mm512_srli_epi32(h, 13), _mm512_set1_epi32(0x7fff8));  // (h >> 16) << 3
    const __m512 t = _mm512_max_ps(n, _mm512_fmadd_ps(n, _mm512_set1_ps(0.5f), _mm512_set1_ps(3.0517578125e-05f)));
    return _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), u8), 19),
                            _mm512_set1_epi32(112 << 4));
  }
  // The dither keys k * 0x85EBCA6B of block indices k0 .. k0 + 15.
  static __m512i keys16(uint32_t k0) {
    const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int(0x85ebca6bu)));
    return _mm512_add_epi32(_mm512_set1_epi32(int(k0 * 0x85ebca6bu)), lanes);
  }
  template <bool kSigned>
  static __m512i codes16(const float* x, __m512 inv, __m512i key) {
    if constexpr (kSigned) {
      return signed16(x, inv);
    } else {
      return unsigned16(x, inv, key);
    }
  }
  // 64 codes: the packs work within 128-bit lanes, leaving 32-bit group
  // 4L + s (L: lane, s: which of the four vectors) with elements 16s + 4L ..
  // 16s + 4L + 3; one permute of 32-bit groups restores the order.
  template <bool kSigned>
  static void encode(const float* x, float inv, uint8_t* codes, uint32_t k) {
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i key[4] = {};
    if constexpr (!kSigned) {
      key[0] = keys16(k);
      const __m512i step = _mm512_set1_epi32(int(16 * 0x85ebca6bu));
      for (int j = 1; j < 4; ++j) key[j] = _mm512_add_epi32(key[j - 1], step);
    }
    const __m512i ab = _mm512_packus_epi32(codes16<kSigned>(x, vinv, key[0]), codes16<kSigned>(x + 16, vinv, key[1]));
    const __m512i cd =
        _mm512_packus_epi32(codes16<kSigned>(x + 32, vinv, key[2]), codes16<kSigned>(x + 48, vinv, key[3]));
    const __m512i bytes = _mm512_packus_epi16(ab, cd);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_si512(codes, _mm512_permutexvar_epi32(order, bytes));
  }
};
#endif

// Writes the codes of one block x[0, n) whose |x| bits have the maximum mb
// and returns its scale (q8_quantize_block of quant8.h, with the maximum
// already found during the update).
template <bool kSigned, class V>
inline __attribute__((always_inline)) float q8_encode_block(const float* x, int64_t n, uint32_t mb, uint8_t* codes) {
  bool encode;
  const float scale = q8_scale(mb, &encode);
  if (!encode) {
    for (int64_t k = 0; k < n; ++k) codes[k] = 0;
    return scale;
  }
  const float inv = 1.0f / scale;
  constexpr int E = Q8Lanes<V>::kEncodeWidth;
  int64_t k = 0;
  for (; k + E <= n; k += E) Q8Lanes<V>::template encode<kSigned>(x + k, inv, codes + k, uint32_t(k));
  for (; k < n; ++k) codes[k] = q8_code<kSigned>(x[k], inv, uint32_t(k));
  return scale;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedoptim
