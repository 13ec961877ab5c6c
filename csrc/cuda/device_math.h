// The vector type of the CUDA kernels: one fp32 lane per thread.
//
// It satisfies the contract of Note [one source of math] with the CUDA
// intrinsics that are correctly rounded whatever nvcc's -fmad, -prec-div and
// -prec-sqrt flags say (__fadd_rn, __fdiv_rn, __fsqrt_rn, __fmaf_rn...), so
// a GPU computes the same bits as the CPU scalar variant. Under the emulation
// header the same intrinsics are host operations (see emulation.h).
#pragma once

#include "../common/convert.h"
#include "../common/macros.h"
#include "../common/update_math.h"

namespace fusedoptim {
namespace cuda {

struct VecF {
  float x;
  VecF() = default;
  FO_DEVICE explicit VecF(float v) : x(v) {}
};

FO_VEC_ARITH(FO_DEVICE, VecF, __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn, __fmaf_rn)
FO_DEVICE VecF neg(VecF a) { return VecF(bits_float(float_bits(a.x) ^ 0x80000000u)); }
FO_DEVICE VecF max_nan(VecF a, VecF b) { return (a.x != a.x) ? a : (a.x > b.x ? a : b); }

// Storage formats <-> fp32, one element.
FO_DEVICE float to_float(float v) { return v; }
FO_DEVICE float to_float(bf16_t v) { return bf16_to_float(v.bits); }
FO_DEVICE float to_float(f16_t v) { return f16_to_float(v.bits); }

template <class S>
FO_DEVICE S from_float(float f);
template <>
FO_DEVICE float from_float<float>(float f) { return f; }
template <>
FO_DEVICE bf16_t from_float<bf16_t>(float f) { return bf16_t{float_to_bf16(f)}; }
template <>
FO_DEVICE f16_t from_float<f16_t>(float f) { return f16_t{float_to_f16(f)}; }

// A 16-byte packet: 4 fp32 or 8 16-bit elements, loaded and stored with one
// 128-bit instruction where the address allows it.
using Pack16 = uint4;

FO_DEVICE unsigned word(const Pack16& p, int j) { return j == 0 ? p.x : j == 1 ? p.y : j == 2 ? p.z : p.w; }
FO_DEVICE void set_word(Pack16& p, int j, unsigned v) {
  if (j == 0) p.x = v;
  else if (j == 1) p.y = v;
  else if (j == 2) p.z = v;
  else p.w = v;
}

template <class S>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int kCount = 4;
  static FO_DEVICE float get(const Pack16& p, int j) { return bits_float(word(p, j)); }
  static FO_DEVICE void set(Pack16& p, int j, float v) { set_word(p, j, float_bits(v)); }
};

template <class S>
struct Lanes16 {
  static constexpr int kCount = 8;
  static FO_DEVICE float get(const Pack16& p, int j) {
    const uint16_t h = uint16_t((j & 1) ? (word(p, j >> 1) >> 16) : (word(p, j >> 1) & 0xffffu));
    return to_float(S{h});
  }
  static FO_DEVICE void set(Pack16& p, int j, float v) {
    const unsigned h = from_float<S>(v).bits;
    const unsigned w = word(p, j >> 1);
    set_word(p, j >> 1, (j & 1) ? ((w & 0xffffu) | (h << 16)) : ((w & 0xffff0000u) | h));
  }
};
template <>
struct Lanes<bf16_t> : Lanes16<bf16_t> {};
template <>
struct Lanes<f16_t> : Lanes16<f16_t> {};

// x rounded to storage type S and back: precision.h's kahan_store() calls
// it (found by ADL; more specialised than the generic vector version).
template <class S>
FO_DEVICE VecF round_as(VecF x) { return VecF(to_float(from_float<S>(x.x))); }

// W consecutive elements of one stream of storage type X, as one thread
// holds them in a packet iteration (Note [multi-tensor apply] in mta_kernels.h):
// fp32 with W = 4 is one 16-byte packet; W = 8 is one packet of a 16-bit
// format or two adjacent packets of fp32. Slice u of a stream starts at
// element u * W; get/set convert one lane from/to fp32.
template <class X, int W>
struct Slice;

// A Slice of one packet: 4 fp32 or 8 16-bit elements.
template <class X>
struct Slice1 {
  Pack16 a;
  FO_DEVICE void load(const void* base, int64_t u) { a = static_cast<const Pack16*>(base)[u]; }
  FO_DEVICE void store(void* base, int64_t u) const { static_cast<Pack16*>(base)[u] = a; }
  FO_DEVICE float get(int l) const { return Lanes<X>::get(a, l); }
  FO_DEVICE void set(int l, float v) { Lanes<X>::set(a, l, v); }
};

template <>
struct Slice<float, 8> {
  Pack16 a, b;
  FO_DEVICE void load(const void* base, int64_t u) {
    const Pack16* q = static_cast<const Pack16*>(base) + 2 * u;
    a = q[0];
    b = q[1];
  }
  FO_DEVICE void store(void* base, int64_t u) const {
    Pack16* q = static_cast<Pack16*>(base) + 2 * u;
    q[0] = a;
    q[1] = b;
  }
  FO_DEVICE float get(int l) const { return l < 4 ? Lanes<float>::get(a, l) : Lanes<float>::get(b, l - 4); }
  FO_DEVICE void set(int l, float v) {
    if (l < 4) Lanes<float>::set(a, l, v);
    else Lanes<float>::set(b, l - 4, v);
  }
};

template <>
struct Slice<float, 4> : Slice1<float> {};
template <>
struct Slice<bf16_t, 8> : Slice1<bf16_t> {};
template <>
struct Slice<f16_t, 8> : Slice1<f16_t> {};

}  // namespace cuda
}  // namespace fusedoptim
