// The loop over memory, compiled once per ISA variant.
//
// CMake compiles this file several times with FUSEDOPTIM_ISA set to
// 0 (scalar), 1 (AVX2) or 2 (AVX-512), each time with that variant's
// instruction-set flags only, in the spirit of ATen's DispatchStub: the math
// comes from common/update_math.h and the vector type from vec_*.h. The
// vector body and the tail instantiate the same template, the tail with one
// lane, so they cannot disagree.
#include "kernels.h"

#include "../common/update_math.h"
#include "vec_scalar.h"

#if FUSEDOPTIM_ISA == 0
namespace fusedoptim { using VecISA = VecScalar; }
#define FO_VARIANT scalar
#elif FUSEDOPTIM_ISA == 1
#include "vec_avx2.h"
namespace fusedoptim { using VecISA = VecAVX2; }
#define FO_VARIANT avx2
#elif FUSEDOPTIM_ISA == 2
#include "vec_avx512.h"
namespace fusedoptim { using VecISA = VecAVX512; }
#define FO_VARIANT avx512
#else
#error "FUSEDOPTIM_ISA must be 0, 1 or 2"
#endif

namespace fusedoptim {
// The vector type a kernel uses for storage type S: VecISA, except where a
// variant has a cheaper layout for a 16-bit format (see VecAVX2x2).
template <class S>
struct VecFor { using type = VecISA; };
#if FUSEDOPTIM_ISA == 1
template <>
struct VecFor<bf16_t> { using type = VecAVX2x2; };
#endif
}  // namespace fusedoptim

#define FO_CAT_(a, b) a##b
#define FO_CAT(a, b) FO_CAT_(a, b)

namespace fusedoptim {
namespace cpu {
namespace {

template <class V, class S, int kWD, bool kAms, bool kMax>
inline void adam_elems(S* p, const S* g, S* m, S* v, S* vmax, int64_t i, const AdamConsts<V>& c) {
  V pv = V::load(p + i), mv = V::load(m + i), vv = V::load(v + i);
  V vmaxv = kAms ? V::load(vmax + i) : V(0.0f);
  adam_update<kWD, kAms, kMax>(pv, V::load(g + i), mv, vv, vmaxv, c);
  pv.store(p + i);
  mv.store(m + i);
  vv.store(v + i);
  if (kAms) vmaxv.store(vmax + i);
}

template <class S, int kWD, bool kAms, bool kMax>
void adam_segment(const AdamTensor& t, int64_t begin, int64_t end, const AdamHyper& h) {
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  S* m = static_cast<S*>(t.exp_avg);
  S* v = static_cast<S*>(t.exp_avg_sq);
  S* vmax = static_cast<S*>(t.max_exp_avg_sq);
  using V = typename VecFor<S>::type;
  const AdamConsts<V> cv(h, t.coeffs);
  const AdamConsts<VecScalar> cs(h, t.coeffs);
  constexpr int W = V::kWidth;
  int64_t i = begin;
  for (; i + W <= end; i += W) adam_elems<V, S, kWD, kAms, kMax>(p, g, m, v, vmax, i, cv);
  for (; i < end; ++i) adam_elems<VecScalar, S, kWD, kAms, kMax>(p, g, m, v, vmax, i, cs);
}

template <class V, class S, bool kWD, int kMom, bool kMax, bool kFirst>
inline void sgd_elems(S* p, const S* g, S* buf, int64_t i, const SGDConsts<V>& c) {
  V pv = V::load(p + i);
  V bv = (kMom != kNoMomentum && !kFirst) ? V::load(buf + i) : V(0.0f);
  sgd_update<kWD, kMom, kMax, kFirst>(pv, V::load(g + i), bv, c);
  pv.store(p + i);
  if (kMom != kNoMomentum) bv.store(buf + i);
}

template <class S, bool kWD, int kMom, bool kMax, bool kFirst>
void sgd_segment(const SGDTensor& t, int64_t begin, int64_t end, const SGDHyper& h) {
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  S* buf = static_cast<S*>(t.momentum_buffer);
  using V = typename VecFor<S>::type;
  const SGDConsts<V> cv(h);
  const SGDConsts<VecScalar> cs(h);
  constexpr int W = V::kWidth;
  int64_t i = begin;
  for (; i + W <= end; i += W) sgd_elems<V, S, kWD, kMom, kMax, kFirst>(p, g, buf, i, cv);
  for (; i < end; ++i) sgd_elems<VecScalar, S, kWD, kMom, kMax, kFirst>(p, g, buf, i, cs);
}

// Runtime flags -> template arguments, one level at a time.
template <class S, int kWD, bool kAms>
AdamSegmentFn pick_adam_max(bool maximize) {
  return maximize ? &adam_segment<S, kWD, kAms, true> : &adam_segment<S, kWD, kAms, false>;
}
template <class S, int kWD>
AdamSegmentFn pick_adam_ams(bool amsgrad, bool maximize) {
  return amsgrad ? pick_adam_max<S, kWD, true>(maximize) : pick_adam_max<S, kWD, false>(maximize);
}
template <class S>
AdamSegmentFn pick_adam_wd(int wd_mode, bool amsgrad, bool maximize) {
  switch (wd_mode) {
    case kNoDecay: return pick_adam_ams<S, kNoDecay>(amsgrad, maximize);
    case kL2: return pick_adam_ams<S, kL2>(amsgrad, maximize);
    case kDecoupled: return pick_adam_ams<S, kDecoupled>(amsgrad, maximize);
    default: return nullptr;
  }
}

AdamSegmentFn pick_adam(int32_t dtype, int wd_mode, bool amsgrad, bool maximize) {
  switch (dtype) {
    case kFloat32: return pick_adam_wd<float>(wd_mode, amsgrad, maximize);
    case kBFloat16: return pick_adam_wd<bf16_t>(wd_mode, amsgrad, maximize);
    case kFloat16: return pick_adam_wd<f16_t>(wd_mode, amsgrad, maximize);
    default: return nullptr;
  }
}

template <class S, bool kWD, int kMom, bool kMax>
SGDSegmentFn pick_sgd_first(bool first) {
  if (kMom == kNoMomentum) return &sgd_segment<S, kWD, kMom, kMax, false>;
  return first ? &sgd_segment<S, kWD, kMom, kMax, true> : &sgd_segment<S, kWD, kMom, kMax, false>;
}
template <class S, bool kWD, int kMom>
SGDSegmentFn pick_sgd_max(bool maximize, bool first) {
  return maximize ? pick_sgd_first<S, kWD, kMom, true>(first) : pick_sgd_first<S, kWD, kMom, false>(first);
}
template <class S, bool kWD>
SGDSegmentFn pick_sgd_mom(int mom, bool maximize, bool first) {
  switch (mom) {
    case kNoMomentum: return pick_sgd_max<S, kWD, kNoMomentum>(maximize, first);
    case kMomentum: return pick_sgd_max<S, kWD, kMomentum>(maximize, first);
    case kNesterov: return pick_sgd_max<S, kWD, kNesterov>(maximize, first);
    default: return nullptr;
  }
}
template <class S>
SGDSegmentFn pick_sgd_wd(bool wd, int mom, bool maximize, bool first) {
  return wd ? pick_sgd_mom<S, true>(mom, maximize, first) : pick_sgd_mom<S, false>(mom, maximize, first);
}

SGDSegmentFn pick_sgd(int32_t dtype, bool wd, int mom, bool maximize, bool first) {
  switch (dtype) {
    case kFloat32: return pick_sgd_wd<float>(wd, mom, maximize, first);
    case kBFloat16: return pick_sgd_wd<bf16_t>(wd, mom, maximize, first);
    case kFloat16: return pick_sgd_wd<f16_t>(wd, mom, maximize, first);
    default: return nullptr;
  }
}

// The probe moves the step's bytes with next to no arithmetic: fp32 lanes
// add, 16-bit lanes add as integers (no conversion), so it measures memory,
// not a format conversion.
template <class S>
struct ProbeLane { using type = S; };
template <> struct ProbeLane<bf16_t> { using type = uint16_t; };
template <> struct ProbeLane<f16_t> { using type = uint16_t; };

template <class S, int kRW>
void probe_segment(void* const* rw, const void* r, int64_t begin, int64_t end) {
  using T = typename ProbeLane<S>::type;
  const T* __restrict g = static_cast<const T*>(r);
  T* x[kRW];
  for (int k = 0; k < kRW; ++k) x[k] = static_cast<T*>(rw[k]);
  // All streams in one pass, as the optimizer walks them; the compiler
  // vectorises this loop with the variant's instruction set.
  for (int64_t i = begin; i < end; ++i) {
    const T gv = g[i];
    for (int k = 0; k < kRW; ++k) x[k][i] = T(x[k][i] + gv);
  }
}

template <class S>
ProbeSegmentFn pick_probe_rw(int nrw) {
  switch (nrw) {
    case 1: return &probe_segment<S, 1>;
    case 2: return &probe_segment<S, 2>;
    case 3: return &probe_segment<S, 3>;
    case 4: return &probe_segment<S, 4>;
    default: return nullptr;
  }
}

ProbeSegmentFn pick_probe(int32_t dtype, int nrw) {
  switch (dtype) {
    case kFloat32: return pick_probe_rw<float>(nrw);
    case kBFloat16: return pick_probe_rw<bf16_t>(nrw);
    case kFloat16: return pick_probe_rw<f16_t>(nrw);
    default: return nullptr;
  }
}

void triad_segment(float* a, const float* b, const float* c, float s, int64_t begin, int64_t end) {
  constexpr int W = VecISA::kWidth;
  const VecISA sv(s);
  int64_t i = begin;
  for (; i + W <= end; i += W) fma(VecISA::load(c + i), sv, VecISA::load(b + i)).store(a + i);
  for (; i < end; ++i) a[i] = std::fma(c[i], s, b[i]);
}

#define FO_STR_(x) #x
#define FO_STR(x) FO_STR_(x)

const KernelTable kTable = {FO_STR(FO_VARIANT), VecISA::kWidth, &pick_adam, &pick_sgd, &pick_probe, &triad_segment};

}  // namespace

const KernelTable* FO_CAT(kernels_, FO_VARIANT)() { return &kTable; }

}  // namespace cpu
}  // namespace fusedoptim
