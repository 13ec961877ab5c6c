// Eight fp32 lanes with AVX2, FMA and F16C.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "../common/convert.h"
#include "../common/macros.h"
#include "../common/precision.h"

namespace fusedoptim {

// mix32 and sr_bits of precision.h on eight 32-bit lanes.
inline __m256i mix32_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x7feb352du)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
// sr_bits(key_hi, first + k) for the lane offsets k of `offsets`:
// (first + k) * golden is first * golden + k * golden (mod 2^32), so the
// per-lane products are constants and one scalar multiply remains.
inline __m256i sr_bits_avx2(uint32_t key_hi, uint32_t first, __m256i offsets_times_golden) {
  const __m256i h = _mm256_add_epi32(_mm256_set1_epi32(int(first * 0x9e3779b9u)), offsets_times_golden);
  return mix32_avx2(_mm256_xor_si256(_mm256_set1_epi32(int(key_hi)), h));
}
#define FO_GOLDEN(k) int((k) * 0x9e3779b9u)

struct VecAVX2 {
  static constexpr int kWidth = 8;
  __m256 x;
  VecAVX2() = default;
  explicit VecAVX2(float v) : x(_mm256_set1_ps(v)) {}
  explicit VecAVX2(__m256 v) : x(v) {}

  static VecAVX2 load(const float* p) { return VecAVX2(_mm256_loadu_ps(p)); }
  static VecAVX2 load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return VecAVX2(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static VecAVX2 load(const f16_t* p) {
    return VecAVX2(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  void store(float* p) const { _mm256_storeu_ps(p, x); }
  // Round to nearest even in the integer unit, NaN -> 0x7FC0 (convert.h):
  // the bf16 bits in the low half of each 32-bit lane.
  static __m256i bf16_bits(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  }
  void store(bf16_t* p) const {
    const __m256i r = bf16_bits(x);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // float_to_bf16_sr of precision.h with the random bits `bits` of each lane.
  static __m256i bf16_bits_sr(__m256 v, __m256i bits) {
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(v), _mm256_srli_epi32(bits, 16)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  }
  // Stochastic rounding of elements lo .. lo + 7 (low words of their indices).
  __attribute__((always_inline)) void store_sr(bf16_t* p, uint32_t key_hi, uint32_t lo) const {
    const __m256i k = _mm256_setr_epi32(FO_GOLDEN(0u), FO_GOLDEN(1u), FO_GOLDEN(2u), FO_GOLDEN(3u), FO_GOLDEN(4u),
                                        FO_GOLDEN(5u), FO_GOLDEN(6u), FO_GOLDEN(7u));
    const __m256i r = bf16_bits_sr(x, sr_bits_avx2(key_hi, lo, k));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  void store(f16_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
};

FO_VEC_ARITH(inline, VecAVX2, _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_div_ps, _mm256_sqrt_ps,
             _mm256_fmadd_ps)
inline VecAVX2 neg(VecAVX2 a) { return VecAVX2(_mm256_xor_ps(a.x, _mm256_set1_ps(-0.0f))); }
inline VecAVX2 max_nan(VecAVX2 a, VecAVX2 b) {
  // MAXPS returns its second operand unless the first is greater: that is
  // (a > b ? a : b); then put back a where a is NaN.
  const __m256 m = _mm256_max_ps(a.x, b.x);
  return VecAVX2(_mm256_blendv_ps(m, a.x, _mm256_cmp_ps(a.x, a.x, _CMP_UNORD_Q)));
}

// Sixteen bf16 lanes as two VecAVX2, so that loads and stores need no
// cross-lane shuffle: unpacking 16 bf16 against zero puts elements 0-3 and
// 8-11 in `lo`, 4-7 and 12-15 in `hi`, and packing lo and hi back restores
// the order. The math is element by element, so the lane order never shows
// and the results are those of VecAVX2 bit for bit.
struct VecAVX2x2 {
  static constexpr int kWidth = 16;
  VecAVX2 lo, hi;
  VecAVX2x2() = default;
  explicit VecAVX2x2(float v) : lo(v), hi(v) {}
  VecAVX2x2(VecAVX2 a, VecAVX2 b) : lo(a), hi(b) {}

  static VecAVX2x2 load(const bf16_t* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    return {VecAVX2(_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x))),
            VecAVX2(_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x)))};
  }
  void store(bf16_t* p) const {
    const __m256i packed = _mm256_packus_epi32(VecAVX2::bf16_bits(lo.x), VecAVX2::bf16_bits(hi.x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
  // Stochastic rounding; `lo` holds elements 0-3 and 8-11, `hi` 4-7 and 12-15.
  __attribute__((always_inline)) void store_sr(bf16_t* p, uint32_t key_hi, uint32_t first) const {
    const __m256i klo = _mm256_setr_epi32(FO_GOLDEN(0u), FO_GOLDEN(1u), FO_GOLDEN(2u), FO_GOLDEN(3u), FO_GOLDEN(8u),
                                          FO_GOLDEN(9u), FO_GOLDEN(10u), FO_GOLDEN(11u));
    const __m256i khi = _mm256_setr_epi32(FO_GOLDEN(4u), FO_GOLDEN(5u), FO_GOLDEN(6u), FO_GOLDEN(7u), FO_GOLDEN(12u),
                                          FO_GOLDEN(13u), FO_GOLDEN(14u), FO_GOLDEN(15u));
    const __m256i packed = _mm256_packus_epi32(VecAVX2::bf16_bits_sr(lo.x, sr_bits_avx2(key_hi, first, klo)),
                                               VecAVX2::bf16_bits_sr(hi.x, sr_bits_avx2(key_hi, first, khi)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
};

inline VecAVX2x2 add(VecAVX2x2 a, VecAVX2x2 b) { return {add(a.lo, b.lo), add(a.hi, b.hi)}; }
inline VecAVX2x2 sub(VecAVX2x2 a, VecAVX2x2 b) { return {sub(a.lo, b.lo), sub(a.hi, b.hi)}; }
inline VecAVX2x2 mul(VecAVX2x2 a, VecAVX2x2 b) { return {mul(a.lo, b.lo), mul(a.hi, b.hi)}; }
inline VecAVX2x2 div(VecAVX2x2 a, VecAVX2x2 b) { return {div(a.lo, b.lo), div(a.hi, b.hi)}; }
inline VecAVX2x2 sqrt(VecAVX2x2 a) { return {sqrt(a.lo), sqrt(a.hi)}; }
inline VecAVX2x2 fma(VecAVX2x2 a, VecAVX2x2 b, VecAVX2x2 c) { return {fma(a.lo, b.lo, c.lo), fma(a.hi, b.hi, c.hi)}; }
inline VecAVX2x2 neg(VecAVX2x2 a) { return {neg(a.lo), neg(a.hi)}; }
inline VecAVX2x2 max_nan(VecAVX2x2 a, VecAVX2x2 b) { return {max_nan(a.lo, b.lo), max_nan(a.hi, b.hi)}; }

// round_as<S> of precision.h in registers: the same bits as a store and a
// load, without the round trip through memory.
template <class S>
inline VecAVX2 round_as(VecAVX2 v) {
  if constexpr (std::is_same_v<S, bf16_t>) {
    return VecAVX2(_mm256_castsi256_ps(_mm256_slli_epi32(VecAVX2::bf16_bits(v.x), 16)));
  } else if constexpr (std::is_same_v<S, f16_t>) {
    return VecAVX2(_mm256_cvtph_ps(_mm256_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT)));
  } else {
    return v;
  }
}
template <class S>
inline VecAVX2x2 round_as(VecAVX2x2 v) {
  return {round_as<S>(v.lo), round_as<S>(v.hi)};
}

}  // namespace fusedoptim
