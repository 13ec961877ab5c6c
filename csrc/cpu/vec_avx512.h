// Sixteen fp32 lanes with AVX-512 F/BW/VL and F16C (the variant runs where
// the CPU has all of them: cpu_features.cpp).
//
// bf16 rounding is done in the integer unit, except in the avx512bf16
// variant (FUSEDOPTIM_BF16_CONVERT), whose bf16 stores use AVX512_BF16's
// VCVTNEPS2BF16 (one instruction instead of seven plus a narrowing) where it
// gives the integer unit's bits: it rounds to nearest even like convert.h,
// but treats subnormal inputs as zero and keeps a NaN's payload, where
// convert.h (and torch's c10::BFloat16) round subnormals and write 0x7FC0
// for every NaN. A vector holding either (VFPCLASSPS) takes the integer path.
// A normal fp32 value rounds to a normal bf16 or to infinity, so no result
// of the fast path is subnormal.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "../common/convert.h"
#include "../common/macros.h"
#include "../common/precision.h"

namespace fusedoptim {

struct VecAVX512 {
  static constexpr int kWidth = 16;
  __m512 x;
  VecAVX512() = default;
  explicit VecAVX512(float v) : x(_mm512_set1_ps(v)) {}
  explicit VecAVX512(__m512 v) : x(v) {}

  static VecAVX512 load(const float* p) { return VecAVX512(_mm512_loadu_ps(p)); }
  static VecAVX512 load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return VecAVX512(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static VecAVX512 load(const f16_t* p) {
    return VecAVX512(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  // Round to nearest even in the integer unit, NaN -> 0x7FC0 (convert.h):
  // the bf16 bits in the low half of each 32-bit lane.
  static __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  }
  void store(bf16_t* p) const {
#if FUSEDOPTIM_BF16_CONVERT
    constexpr int kNaNOrSubnormal = 0x01 | 0x20 | 0x80;  // quiet NaN, subnormal, signalling NaN
    if (__builtin_expect(_mm512_fpclass_ps_mask(x, kNaNOrSubnormal) == 0, 1)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
      return;
    }
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(x)));
  }
  void store(f16_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  // Stochastic rounding of elements lo .. lo + 15: float_to_bf16_sr with
  // the bits sr_bits(key_hi, lo + k) of precision.h.
  __attribute__((always_inline)) void store_sr(bf16_t* p, uint32_t key_hi, uint32_t lo) const {
    // (lo + k) * golden = lo * golden + k * golden (mod 2^32): one scalar multiply.
    const __m512i k = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int(0x9e3779b9u)));
    __m512i b = _mm512_xor_si512(_mm512_set1_epi32(int(key_hi)),
                                 _mm512_add_epi32(_mm512_set1_epi32(int(lo * 0x9e3779b9u)), k));
    b = _mm512_xor_si512(b, _mm512_srli_epi32(b, 16));
    b = _mm512_mullo_epi32(b, _mm512_set1_epi32(int(0x7feb352du)));
    b = _mm512_xor_si512(b, _mm512_srli_epi32(b, 15));
    b = _mm512_mullo_epi32(b, _mm512_set1_epi32(int(0x846ca68bu)));
    b = _mm512_xor_si512(b, _mm512_srli_epi32(b, 16));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_srli_epi32(b, 16)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

FO_VEC_ARITH(inline, VecAVX512, _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_div_ps, _mm512_sqrt_ps,
             _mm512_fmadd_ps)
inline VecAVX512 neg(VecAVX512 a) {
  return VecAVX512(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.x), _mm512_set1_epi32(int(0x80000000u)))));
}
inline VecAVX512 max_nan(VecAVX512 a, VecAVX512 b) {
  const __m512 m = _mm512_max_ps(a.x, b.x);
  return VecAVX512(_mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(a.x, a.x, _CMP_UNORD_Q), a.x));
}

// round_as<S> of precision.h in registers (same bits as a store and a load).
template <class S>
inline VecAVX512 round_as(VecAVX512 v) {
  if constexpr (std::is_same_v<S, bf16_t>) {
    return VecAVX512(_mm512_castsi512_ps(_mm512_slli_epi32(VecAVX512::bf16_bits(v.x), 16)));
  } else if constexpr (std::is_same_v<S, f16_t>) {
    return VecAVX512(_mm512_cvtph_ps(_mm512_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT)));
  } else {
    return v;
  }
}

}  // namespace fusedoptim
