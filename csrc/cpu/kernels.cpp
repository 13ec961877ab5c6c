// The loop over memory, compiled once per ISA variant.
//
// CMake compiles this file several times with FUSEDOPTIM_ISA set to
// 0 (scalar), 1 (AVX2) or 2 (AVX-512), each time with that variant's
// instruction-set flags only, in the spirit of ATen's DispatchStub: the math
// comes from common/update_math.h and the vector type from vec_*.h. The
// vector body and the tail instantiate the same template, the tail with one
// lane, so they cannot disagree.
#include "kernels.h"

#include <algorithm>
#include <type_traits>

#include "../common/layouts.h"
#include "../common/precision.h"
#include "../common/quant8.h"
#include "../common/store.h"
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
#include "vec_avx2.h"
#include "vec_avx512.h"
namespace fusedoptim { using VecISA = VecAVX512; }
#if FUSEDOPTIM_BF16_CONVERT
#define FO_VARIANT avx512bf16
#else
#define FO_VARIANT avx512
#endif
#else
#error "FUSEDOPTIM_ISA must be 0, 1 or 2"
#endif
#include "quant8_vec.h"

namespace fusedoptim {
// The vector type a kernel uses for params of S and states of T: VecISA,
// except where a variant has a cheaper layout for a 16-bit format (see
// VecAVX2x2, which loads and stores bf16 only).
template <class S, class T, int kStore>
struct VecFor { using type = VecISA; };
#if FUSEDOPTIM_ISA == 1
template <int kStore>
struct VecFor<bf16_t, bf16_t, kStore> { using type = VecAVX2x2; };
#endif
}  // namespace fusedoptim

#define FO_UNROLL_CPU _Pragma("GCC unroll 2")
// Note [streaming loops]
// ~~~~~~~~~~~~~~~~~~~~~~
// Streaming loops ask for each stream's lines some elements ahead: one core
// alone does not keep enough misses in flight on the hardware prefetcher's
// lead. How far ahead pays depends on the param's width (measured on AVX2
// Zen, 1 thread): 512 elements took SGD bf16 on 16M-64M elements from
// 0.75-0.86x to 1.05-1.08x torch fused's step, where 128 fell back to
// 0.65x at 16M; for fp32 params 512 elements (2 KB) cost SGD 10% inside a
// real training loop (0.90x torch fused on a 12.6M-param MLP, whose grads
// backward has just written), where 128 gives 1.04x and keeps the sweep's
// large fp32 cells level. Prefetching past a tensor's end is harmless (a
// hint, never a fault). The loop body covers a whole cache line of the
// param stream, so each line is asked for once: in cache-sized tensors,
// where a step is bound by instructions rather than memory, every
// instruction counts. For the same
// reason a segment works on a local copy of its tensor (the vector stores
// may alias anything whose address is known, so the fields of a tensor
// passed by reference would be reloaded at every vector) and, with plain
// stores, decides once, outside the loop, whether the grads are scaled. The
// elements and their operations are the same, in the same order: so are the
// bits.
constexpr int kPrefetchAhead = 512;  // 8-bit states
constexpr int kLineBytes = 64;

// Elements ahead for a step on params of S.
template <class S>
constexpr int prefetch_distance() {
  return sizeof(S) >= 4 ? 128 : 512;
}

// The per-vector helpers take vectors of up to 64 bytes by value: inlined,
// they live in registers; called, they would go through the stack.
#define FO_ALWAYS_INLINE inline __attribute__((always_inline))
#define FO_CAT_(a, b) a##b
#define FO_CAT(a, b) FO_CAT_(a, b)

namespace fusedoptim {
namespace cpu {
namespace {

// Vectors of V per cache line of an S stream (at most 4: the scalar variant
// processes one element per vector).
template <class V, class S>
constexpr int vectors_per_line() {
  constexpr int n = kLineBytes / int(V::kWidth * sizeof(S));
  return n < 1 ? 1 : (n > 4 ? 4 : n);
}

// Asks for every line of the stream whose next n elements start at p,
// `ahead` elements further on (rw: 1 for a stream the loop writes).
template <int n, int ahead, class X>
FO_ALWAYS_INLINE void prefetch_ahead(const X* p, int rw) {
  if constexpr (ahead > 0) {
    const char* a = reinterpret_cast<const char*>(p + ahead);
    for (int o = 0; o < int(n * sizeof(X)); o += kLineBytes) {
      if (rw) {
        __builtin_prefetch(a + o, 1);
      } else {
        __builtin_prefetch(a + o, 0);
      }
    }
  }
}

// One vector of a tensor's param and extra streams from element i on, as
// the store modes of common/store.h read and write them.
template <int kStore, class V, class S>
struct ParamAt {
  using E = std::conditional_t<kStore == kStoreMaster, float, S>;  // the extra stream
  S* p;
  void* x;
  int64_t i;
  uint32_t key_hi;  // stochastic rounding: key_at(key, i)

  FO_ALWAYS_INLINE V load_param() const { return V::load(p + i); }
  FO_ALWAYS_INLINE V load_extra() const { return V::load(static_cast<const E*>(x) + i); }
  FO_ALWAYS_INLINE void param(V v) const { v.store(p + i); }
  FO_ALWAYS_INLINE void param_sr(V v) const { v.store_sr(p + i, key_hi, uint32_t(uint64_t(i))); }
  FO_ALWAYS_INLINE void extra(V v) const { v.store(static_cast<E*>(x) + i); }
};

// The random key of the elements from i on (stochastic rounding only).
template <int kStore>
inline uint32_t key_at(uint32_t key, int64_t i) {
  return kStore == kStoreStochastic ? sr_key_hi(key, uint32_t(uint64_t(i) >> 32)) : 0u;
}

// Runs loop(scale_grad) with scale_grad a compile-time constant for plain
// stores, the common case, where the decision taken out of the loop is
// worth a second copy of it; the other store modes, whose loops are bound
// by longer chains, take it as a run-time bool (one copy: compile time).
template <int kStore, class Loop>
FO_ALWAYS_INLINE void unswitch_grad_scaling(float grad_mul, const Loop& loop) {
  if constexpr (kStore == kStorePlain) {
    if (grad_mul == 1.0f) {
      loop(std::false_type());
    } else {
      loop(std::true_type());
    }
  } else {
    loop(!(grad_mul == 1.0f));
  }
}

// Element(s) i of an Adam tensor: the update from p0, the states stored.
// Returns the updated param for the caller to store.
template <class V, class S, class T, int kWD, bool kAms, bool kMax>
FO_ALWAYS_INLINE V adam_states(const AdamTensor& t, int64_t i, V p0, const AdamConsts<V>& c) {
  const S* g = static_cast<const S*>(t.grad);
  T* m = static_cast<T*>(t.exp_avg);
  T* v = static_cast<T*>(t.exp_avg_sq);
  T* vmax = static_cast<T*>(t.max_exp_avg_sq);
  V pv = p0, mv = V::load(m + i), vv = V::load(v + i);
  V vmaxv = kAms ? V::load(vmax + i) : V(0.0f);
  adam_update<kWD, kAms, kMax>(pv, V::load(g + i), mv, vv, vmaxv, c);
  mv.store(m + i);
  vv.store(v + i);
  if (kAms) vmaxv.store(vmax + i);
  return pv;
}

template <class V, class S, class T, int kStore, int kWD, bool kAms, bool kMax>
FO_ALWAYS_INLINE void adam_elems(const AdamTensor& t, int64_t i, const AdamConsts<V>& c) {
  const ParamAt<kStore, V, S> io{static_cast<S*>(t.param), t.extra, i, key_at<kStore>(t.sr_key, i)};
  const V p0 = start_param<kStore, V>(io);
  store_param<S, kStore>(io, p0, adam_states<V, S, T, kWD, kAms, kMax>(t, i, p0, c));
}

// Note [two-pass stores]
// Stochastic rounding and Kahan summation append a long dependency chain
// (a hash; a compensated sum and two roundings) to the update's own (sqrt,
// div). Done in one loop body, so few iterations fit the out-of-order window
// that the chains' latency is exposed: Kahan bf16 took twice the time of a
// plain step on AVX2. Their kernels therefore run a block of vectors in two
// passes: the updates (states stored, fp32 results kept in registers or on
// the stack), then the stores. The operations and so the bits are the same.
constexpr int kTwoPassVectors = 4;

template <class S, class T, int kStore, int kWD, bool kAms, bool kMax>
void adam_segment(const AdamTensor& tensor, int64_t begin, int64_t end, const AdamHyper& h) {
  using V = typename VecFor<S, T, kStore>::type;
  const AdamTensor t = tensor;  // see Note [streaming loops]
  const AdamConsts<VecScalar> cs(h, t.coeffs);
  constexpr int W = V::kWidth;
  int64_t i = begin;
  if constexpr (kStore == kStoreStochastic || kStore == kStoreKahan) {
    const AdamConsts<V> cv(h, t.coeffs);
    constexpr int B = kTwoPassVectors;
    S* p = static_cast<S*>(t.param);
    for (; i + B * W <= end; i += B * W) {
      V pv[B];
      for (int j = 0; j < B; ++j) {
        const int64_t k = i + j * W;
        const V p0 = start_param<kStore, V>(ParamAt<kStore, V, S>{p, t.extra, k, 0u});
        pv[j] = adam_states<V, S, T, kWD, kAms, kMax>(t, k, p0, cv);
      }
      for (int j = 0; j < B; ++j) {
        const int64_t k = i + j * W;
        const ParamAt<kStore, V, S> io{p, t.extra, k, key_at<kStore>(t.sr_key, k)};
        store_param<S, kStore>(io, io.load_param(), pv[j]);
      }
    }
  }
  const auto loop = [&](auto scale_grad) {
    AdamConsts<V> cv(h, t.coeffs);
    cv.scale_grad = scale_grad;
    constexpr int L = vectors_per_line<V, S>();
    for (; i + L * W <= end; i += L * W) {
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const S*>(t.grad) + i, 0);
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const S*>(t.param) + i, 1);
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const T*>(t.exp_avg) + i, 1);
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const T*>(t.exp_avg_sq) + i, 1);
      for (int j = 0; j < L; ++j) adam_elems<V, S, T, kStore, kWD, kAms, kMax>(t, i + j * W, cv);
    }
    for (; i + W <= end; i += W) adam_elems<V, S, T, kStore, kWD, kAms, kMax>(t, i, cv);
  };
  unswitch_grad_scaling<kStore>(h.grad_mul, loop);
  for (; i < end; ++i) adam_elems<VecScalar, S, T, kStore, kWD, kAms, kMax>(t, i, cs);
}

template <class V, class S, class T, int kStore, bool kWD, int kMom, bool kMax, bool kFirst>
FO_ALWAYS_INLINE void sgd_elems(const SGDTensor& t, int64_t i, const SGDConsts<V>& c) {
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  T* buf = static_cast<T*>(t.momentum_buffer);
  const ParamAt<kStore, V, S> io{p, t.extra, i, key_at<kStore>(t.sr_key, i)};
  const V p0 = start_param<kStore, V>(io);
  V pv = p0;
  V bv = (kMom != kNoMomentum && !kFirst) ? V::load(buf + i) : V(0.0f);
  sgd_update<kWD, kMom, kMax, kFirst>(pv, V::load(g + i), bv, c);
  store_param<S, kStore>(io, p0, pv);
  if (kMom != kNoMomentum) bv.store(buf + i);
}

template <class S, class T, int kStore, bool kWD, int kMom, bool kMax, bool kFirst>
void sgd_segment(const SGDTensor& tensor, int64_t begin, int64_t end, const SGDHyper& h) {
  using V = typename VecFor<S, T, kStore>::type;
  const SGDTensor t = tensor;  // see Note [streaming loops]
  const SGDConsts<VecScalar> cs(h);
  constexpr int W = V::kWidth;
  int64_t i = begin;
  const auto loop = [&](auto scale_grad) {
    SGDConsts<V> cv(h);
    cv.scale_grad = scale_grad;
    constexpr int L = vectors_per_line<V, S>();
    for (; i + L * W <= end; i += L * W) {
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const S*>(t.grad) + i, 0);
      prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const S*>(t.param) + i, 1);
      if (kMom != kNoMomentum) prefetch_ahead<L * W, prefetch_distance<S>()>(static_cast<const T*>(t.momentum_buffer) + i, 1);
      for (int j = 0; j < L; ++j) sgd_elems<V, S, T, kStore, kWD, kMom, kMax, kFirst>(t, i + j * W, cv);
    }
    for (; i + W <= end; i += W) sgd_elems<V, S, T, kStore, kWD, kMom, kMax, kFirst>(t, i, cv);
  };
  unswitch_grad_scaling<kStore>(h.grad_mul, loop);
  for (; i < end; ++i) sgd_elems<VecScalar, S, T, kStore, kWD, kMom, kMax, kFirst>(t, i, cs);
}

// 8-bit states (Note [8-bit states] in common/quant8.h): a segment starts
// at a block boundary (the driver aligns chunks to the block size), and each
// block of Adam is dequantized, updated and requantized over a few KB of
// stack (in L1): adam_update with its bias correction folded (Note [folded
// bias correction] in update_math.h), the param stored as its store mode
// says, the new moments kept on the stack and their running |x| maximum in a
// register; then, once the block's scales are known, the codes written. SGD
// dequantizes inside its update pass. The lanes are Q8Lanes' (quant8_vec.h)
// of the variant's vector type. The update pass covers kQ8Step elements a
// turn, with one prefetch per cache line of the param and grad streams.
//
// Note [8-bit passes]
// ~~~~~~~~~~~~~~~~~~~
// A block's passes are arranged one of two ways (AdamHyper::q8_overlap,
// chosen per call by dispatch.cpp; the same operations on the same values
// either way, so the same bits):
//  - separate: the codes are dequantized in a pass of their own before the
//    update, and the block's codes are written after it. The update is a
//    long chain per vector (square root, division), and on Zen 3 a loop
//    body that also decodes two moments holds so many instructions that few
//    vectors' chains fit the out-of-order window at once: apart, the update
//    loop is as short as with fp32 states, 1.22 against 1.34 ns per element
//    on one core. For the same reason, writing block j's codes during block
//    j + 1's update made the step slower there, 28 against 22 ms (AdamW,
//    16M fp32 params, AVX2).
//  - overlap: the update pass decodes its codes itself, and writes the
//    previous block's codes as it goes (the current block's moments go to
//    the other half of a double buffer). Where the window holds the longer
//    body, the requantization's integer work fills what the divider leaves
//    idle. On a 2-core Xeon (Sapphire Rapids class), against torch's fused
//    fp32 step with 2 threads: AVX-512 lanes 1.28x in separate passes, 1.44x
//    with the decode in the update, 1.51x with the codes written during the
//    next block's update; AVX2 lanes 1.19-1.20x separate, 1.53x overlapped
//    (two rounds of bench/bench_state_bits.py each).
// With bf16 params the conversions lengthen the body: overlapped, AVX2 lanes
// were 4-5% slower there on the Xeon (AVX-512 lanes still 3-6% faster;
// AdamW, 16M params, 9 rounds in turns in one process); the choice stays
// one per CPU, made for fp32 params.
// So AVX2 lanes on AMD CPUs run separate passes and every other vector
// variant overlaps; the scalar variant runs separate passes only. Those are
// the two cores measured: the out-of-order window is what differs (256
// entries on Zen 3, 512 on the Xeon's Golden Cove cores, which the AVX2-only
// Alder Lake and Raptor Lake desktops share); the other Intel cores that run
// the AVX2 variant (Haswell to Comet Lake, 192-224 entries) and AMD's
// AVX-512 cores (Zen 4 and 5) are unmeasured. FUSEDOPTIM_Q8_PASSES or
// fusedoptim.set_q8_passes() forces either.
//
// The grads are scaled by grad_mul whether or not it is 1: x * 1 is x, bit
// for bit (NaNs keep their payload, quieted as the update's next operation
// would quiet them), so the update has no branch, as in the CUDA kernels.
using Q8Vec = VecISA;
constexpr int kQ8Step = 4 * Q8Vec::kWidth;  // 32 elements with AVX2, 64 with AVX-512

// Dequantizes element(s) k of a block: exp_avg into m[k], exp_avg_sq into
// r[k] (v = r * r; the update then leaves sqrt(v) there).
template <class V>
FO_ALWAYS_INLINE void adam_q8_decode(const uint8_t* mc, const uint8_t* vc, int64_t k, float sm, float sv,
                                     float* m, float* r) {
  using Q = Q8Lanes<V>;
  const V root = mul(Q::unsigned_values(vc + k), V(sv));
  mul(Q::signed_values(mc + k), V(sm)).store(m + k);
  mul(root, root).store(r + k);
}

// Element(s) k of a block at element b0 of the tensor whose scales are sm
// and sv: the states come from m[k] and r[k] where a pass of their own
// dequantized them, else from the codes (kOverlap), with the same
// operations (adam_q8_decode). The new moments go to m[k] and r[k].
template <class V, class S, int kStore, int kWD, bool kMax, bool kOverlap>
FO_ALWAYS_INLINE void adam_q8_elems(const AdamTensor& t, int64_t b0, int64_t k, float* m, float* r,
                                    typename Q8Lanes<V>::Max& mmax, typename Q8Lanes<V>::Max& rmax,
                                    const AdamConsts<V>& c, float sm, float sv) {
  using Q = Q8Lanes<V>;
  const int64_t i = b0 + k;
  const ParamAt<kStore, V, S> io{static_cast<S*>(t.param), t.extra, i, key_at<kStore>(t.sr_key, i)};
  const V p0 = start_param<kStore, V>(io);
  V pv = p0, unused(0.0f), mv, vv;
  if constexpr (kOverlap) {
    const V root = mul(Q::unsigned_values(static_cast<const uint8_t*>(t.exp_avg_sq) + i), V(sv));
    mv = mul(Q::signed_values(static_cast<const uint8_t*>(t.exp_avg) + i), V(sm));
    vv = mul(root, root);
  } else {
    mv = V::load(m + k);
    vv = V::load(r + k);
  }
  adam_update<kWD, false, kMax, true>(pv, V::load(static_cast<const S*>(t.grad) + i), mv, vv, unused, c);
  const V new_root = sqrt(vv);  // exp_avg_sq is quantized as its root
  mv.store(m + k);
  new_root.store(r + k);
  mmax = Q::max_abs(mmax, mv);
  rmax = Q::max_abs(rmax, new_root);
  store_param<S, kStore>(io, p0, pv);
}

// Codes of x[from, to) of a block whose scale has the reciprocal inv.
template <bool kSigned, class V>
FO_ALWAYS_INLINE void q8_encode_range(const float* x, int64_t from, int64_t to, float inv, uint8_t* codes) {
  constexpr int E = Q8Lanes<V>::kEncodeWidth;
  int64_t k = from;
  for (; k + E <= to; k += E) Q8Lanes<V>::template encode<kSigned>(x + k, inv, codes + k, uint32_t(k));
  for (; k < to; ++k) codes[k] = q8_code<kSigned>(x[k], inv, uint32_t(k));
}

template <class S, int kStore, int kWD, bool kMax, bool kOverlap>
void adam_q8_passes(const AdamTensor& tensor, int64_t begin, int64_t end, const AdamHyper& h) {
  // A local copy: no store through a param or code pointer can change it,
  // so its pointers stay in registers across the loop.
  const AdamTensor t = tensor;
  using V = Q8Vec;
  using Q = Q8Lanes<V>;
  AdamConsts<V> cv(h, t.coeffs);
  AdamConsts<VecScalar> cs(h, t.coeffs);
  cv.scale_grad = cs.scale_grad = true;  // no branch (see above)
  constexpr int W = V::kWidth;
  constexpr int E = Q::kEncodeWidth;
  static_assert(kQ8Step % E == 0, "a turn of the update loop writes whole vectors of codes");
  const int64_t B = h.q8_block;
  // The moments of the block being updated, and with kOverlap of the
  // previous one, whose codes are written during this block's update.
  constexpr int kBuffers = kOverlap ? 2 : 1;
  alignas(64) float m[kBuffers][kQ8MaxBlock];
  alignas(64) float r[kBuffers][kQ8MaxBlock];
  uint8_t* mc = static_cast<uint8_t*>(t.exp_avg);
  uint8_t* vc = static_cast<uint8_t*>(t.exp_avg_sq);
  int64_t pb0 = -1, pn = 0;  // the block whose codes are still to be written (kOverlap)
  float pinv_m = 0.0f, pinv_r = 0.0f;
  int cur = 0;
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t n = std::min(B, end - b0);
    const int64_t blk = b0 / B;
    if constexpr (kPrefetchAhead > 0) {
      const int64_t ahead = b0 + B;
      for (int64_t o = 0; o < B; o += 64) {
        __builtin_prefetch(mc + ahead + o, 1);
        __builtin_prefetch(vc + ahead + o, 1);
      }
    }
    const float sm = t.exp_avg_scale[blk], sv = t.exp_avg_sq_scale[blk];
    float* mb = m[cur];
    float* rb = r[cur];
    int64_t k = 0;
    if constexpr (!kOverlap) {
      for (; k + W <= n; k += W) adam_q8_decode<V>(mc + b0, vc + b0, k, sm, sv, mb, rb);
      for (; k < n; ++k) adam_q8_decode<VecScalar>(mc + b0, vc + b0, k, sm, sv, mb, rb);
      k = 0;
    }
    typename Q::Max mmax = Q::zero(), rmax = Q::zero();
    const auto turn = [&](int64_t at) {
      prefetch_ahead<kQ8Step, kPrefetchAhead>(static_cast<const S*>(t.grad) + b0 + at, 0);
      prefetch_ahead<kQ8Step, kPrefetchAhead>(static_cast<const S*>(t.param) + b0 + at, 1);
      for (int j = 0; j < kQ8Step; j += W) adam_q8_elems<V, S, kStore, kWD, kMax, kOverlap>(t, b0, at + j, mb, rb, mmax, rmax, cv, sm, sv);
    };
    if (kOverlap && pb0 >= 0) {
      // The previous block is a whole one (only a segment's last can be
      // shorter), so its codes run at least as far as this block's turns.
      const float* pm = m[kBuffers - 1 - cur];  // the other buffer
      const float* pr = r[kBuffers - 1 - cur];
      for (; k + kQ8Step <= n; k += kQ8Step) {
        turn(k);
        for (int j = 0; j < kQ8Step; j += E) {
          Q::template encode<true>(pm + k + j, pinv_m, mc + pb0 + k + j, uint32_t(k + j));
          Q::template encode<false>(pr + k + j, pinv_r, vc + pb0 + k + j, uint32_t(k + j));
        }
      }
      q8_encode_range<true, V>(pm, k, pn, pinv_m, mc + pb0);
      q8_encode_range<false, V>(pr, k, pn, pinv_r, vc + pb0);
      pb0 = -1;
    } else {
      for (; k + kQ8Step <= n; k += kQ8Step) turn(k);
    }
    for (; k + W <= n; k += W) adam_q8_elems<V, S, kStore, kWD, kMax, kOverlap>(t, b0, k, mb, rb, mmax, rmax, cv, sm, sv);
    uint32_t mmax1 = Q::reduce(mmax), rmax1 = Q::reduce(rmax);
    for (; k < n; ++k) adam_q8_elems<VecScalar, S, kStore, kWD, kMax, kOverlap>(t, b0, k, mb, rb, mmax1, rmax1, cs, sm, sv);
    bool enc_m, enc_r;
    const float scale_m = q8_scale(mmax1, &enc_m), scale_r = q8_scale(rmax1, &enc_r);
    t.exp_avg_scale[blk] = scale_m;
    t.exp_avg_sq_scale[blk] = scale_r;
    if (kOverlap && enc_m && enc_r) {  // written during the next block's update
      pb0 = b0;
      pn = n;
      pinv_m = 1.0f / scale_m;
      pinv_r = 1.0f / scale_r;
      cur = kBuffers - 1 - cur;
    } else {  // (also a block of zeros or nonfinite values: all codes 0)
      q8_encode_block<true, V>(mb, n, mmax1, mc + b0);
      q8_encode_block<false, V>(rb, n, rmax1, vc + b0);
    }
  }
  if (kOverlap && pb0 >= 0) {
    q8_encode_range<true, V>(m[kBuffers - 1 - cur], 0, pn, pinv_m, mc + pb0);
    q8_encode_range<false, V>(r[kBuffers - 1 - cur], 0, pn, pinv_r, vc + pb0);
  }
}

// Note [8-bit passes]: the arrangement the call asks for (the scalar
// variant compiles only separate passes).
template <class S, int kStore, int kWD, bool kMax>
void adam_q8_segment(const AdamTensor& tensor, int64_t begin, int64_t end, const AdamHyper& h) {
  if (FUSEDOPTIM_ISA >= 1 && h.q8_overlap) {
    adam_q8_passes<S, kStore, kWD, kMax, FUSEDOPTIM_ISA >= 1>(tensor, begin, end, h);
  } else {
    adam_q8_passes<S, kStore, kWD, kMax, false>(tensor, begin, end, h);
  }
}

template <class V, class S, int kStore, bool kWD, int kMom, bool kMax, bool kFirst>
FO_ALWAYS_INLINE void sgd_q8_elems(const SGDTensor& t, int64_t i, float* buf, float sb,
                                   typename Q8Lanes<V>::Max& bmax, const SGDConsts<V>& c) {
  using Q = Q8Lanes<V>;
  const ParamAt<kStore, V, S> io{static_cast<S*>(t.param), t.extra, i, key_at<kStore>(t.sr_key, i)};
  const V p0 = start_param<kStore, V>(io);
  V pv = p0;
  V bv = kFirst ? V(0.0f) : mul(Q::signed_values(static_cast<const uint8_t*>(t.momentum_buffer) + i), V(sb));
  sgd_update<kWD, kMom, kMax, kFirst>(pv, V::load(static_cast<const S*>(t.grad) + i), bv, c);
  bv.store(buf);
  bmax = Q::max_abs(bmax, bv);
  store_param<S, kStore>(io, p0, pv);
}

template <class S, int kStore, bool kWD, int kMom, bool kMax, bool kFirst>
void sgd_q8_segment(const SGDTensor& tensor, int64_t begin, int64_t end, const SGDHyper& h) {
  const SGDTensor t = tensor;  // in registers across the loop (adam_q8_segment)
  using V = Q8Vec;
  using Q = Q8Lanes<V>;
  SGDConsts<V> cv(h);
  SGDConsts<VecScalar> cs(h);
  cv.scale_grad = cs.scale_grad = true;  // no branch (see above)
  constexpr int W = V::kWidth;
  const int64_t B = h.q8_block;
  alignas(64) float buf[kQ8MaxBlock];
  uint8_t* bc = static_cast<uint8_t*>(t.momentum_buffer);
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t n = std::min(B, end - b0);
    const int64_t blk = b0 / B;
    if constexpr (kPrefetchAhead > 0) {
      for (int64_t o = 0; o < B; o += 64) __builtin_prefetch(bc + b0 + B + o, 1);
    }
    const float sb = kFirst ? 0.0f : t.momentum_scale[blk];
    typename Q::Max bmax = Q::zero();
    int64_t k = 0;
    for (; k + kQ8Step <= n; k += kQ8Step) {
      prefetch_ahead<kQ8Step, kPrefetchAhead>(static_cast<const S*>(t.grad) + b0 + k, 0);
      prefetch_ahead<kQ8Step, kPrefetchAhead>(static_cast<const S*>(t.param) + b0 + k, 1);
#pragma GCC unroll 1  // one copy of the body: compile time
      for (int j = 0; j < kQ8Step; j += W) {
        sgd_q8_elems<V, S, kStore, kWD, kMom, kMax, kFirst>(t, b0 + k + j, buf + k + j, sb, bmax, cv);
      }
    }
    for (; k + W <= n; k += W) sgd_q8_elems<V, S, kStore, kWD, kMom, kMax, kFirst>(t, b0 + k, buf + k, sb, bmax, cv);
    uint32_t bmax1 = Q::reduce(bmax);
    for (; k < n; ++k) sgd_q8_elems<VecScalar, S, kStore, kWD, kMom, kMax, kFirst>(t, b0 + k, buf + k, sb, bmax1, cs);
    t.momentum_scale[blk] = q8_encode_block<true, V>(buf, n, bmax1, bc + b0);
  }
}

// Runtime flags -> template arguments, one level at a time.
template <class S, class T, int kStore, int kWD, bool kAms>
AdamSegmentFn pick_adam_max(bool maximize) {
  if constexpr (std::is_same_v<T, q8_t>) {
    if (kAms) return nullptr;  // 8-bit states keep no max_exp_avg_sq
    return maximize ? &adam_q8_segment<S, kStore, kWD, true> : &adam_q8_segment<S, kStore, kWD, false>;
  } else {
    return maximize ? &adam_segment<S, T, kStore, kWD, kAms, true> : &adam_segment<S, T, kStore, kWD, kAms, false>;
  }
}
template <class S, class T, int kStore, int kWD>
AdamSegmentFn pick_adam_ams(bool amsgrad, bool maximize) {
  return amsgrad ? pick_adam_max<S, T, kStore, kWD, true>(maximize) : pick_adam_max<S, T, kStore, kWD, false>(maximize);
}
template <class S, class T, int kStore>
AdamSegmentFn pick_adam_wd(int wd_mode, bool amsgrad, bool maximize) {
  switch (wd_mode) {
    case kNoDecay: return pick_adam_ams<S, T, kStore, kNoDecay>(amsgrad, maximize);
    case kL2: return pick_adam_ams<S, T, kStore, kL2>(amsgrad, maximize);
    case kDecoupled: return pick_adam_ams<S, T, kStore, kDecoupled>(amsgrad, maximize);
    default: return nullptr;
  }
}

template <class S, class T, bool kWD, int kMom, bool kMax, int kStore>
SGDSegmentFn pick_sgd_first(bool first) {
  if constexpr (std::is_same_v<T, q8_t>) {
    // Without momentum there is no state to quantize: the plain kernel.
    if constexpr (kMom == kNoMomentum) {
      using Plain = std::conditional_t<kStore == kStoreMaster, float, S>;  // the layout's fp32-state twin
      return &sgd_segment<S, Plain, kStore, kWD, kMom, kMax, false>;
    } else {
      return first ? &sgd_q8_segment<S, kStore, kWD, kMom, kMax, true>
                   : &sgd_q8_segment<S, kStore, kWD, kMom, kMax, false>;
    }
  } else {
    if (kMom == kNoMomentum) return &sgd_segment<S, T, kStore, kWD, kMom, kMax, false>;
    return first ? &sgd_segment<S, T, kStore, kWD, kMom, kMax, true> : &sgd_segment<S, T, kStore, kWD, kMom, kMax, false>;
  }
}
template <class S, class T, int kStore, bool kWD, int kMom>
SGDSegmentFn pick_sgd_max(bool maximize, bool first) {
  return maximize ? pick_sgd_first<S, T, kWD, kMom, true, kStore>(first)
                  : pick_sgd_first<S, T, kWD, kMom, false, kStore>(first);
}
template <class S, class T, int kStore, bool kWD>
SGDSegmentFn pick_sgd_mom(int mom, bool maximize, bool first) {
  switch (mom) {
    case kNoMomentum: return pick_sgd_max<S, T, kStore, kWD, kNoMomentum>(maximize, first);
    case kMomentum: return pick_sgd_max<S, T, kStore, kWD, kMomentum>(maximize, first);
    case kNesterov: return pick_sgd_max<S, T, kStore, kWD, kNesterov>(maximize, first);
    default: return nullptr;
  }
}
template <class S, class T, int kStore>
SGDSegmentFn pick_sgd_wd(bool wd, int mom, bool maximize, bool first) {
  return wd ? pick_sgd_mom<S, T, kStore, true>(mom, maximize, first)
            : pick_sgd_mom<S, T, kStore, false>(mom, maximize, first);
}

// Whether this variant compiles the kernels of layout L: all of them, but
// in the AVX512_BF16 variant only those that round bf16 params or states to
// nearest with plain stores or from master weights (its bf16 stores are all
// that it changes); it hands the others, stochastic rounding and Kahan
// summation among them, to the AVX-512 variant, to keep the build short.
template <class L>
constexpr bool compiled_here() {
#if FUSEDOPTIM_BF16_CONVERT
  return (std::is_same_v<typename L::Param, bf16_t> || std::is_same_v<typename L::State, bf16_t>) &&
         (L::kStore == kStorePlain || L::kStore == kStoreMaster);
#else
  return true;
#endif
}

// One instantiation per layout of common/layouts.h.
AdamSegmentFn pick_adam(const Layout& l, int wd_mode, bool amsgrad, bool maximize) {
  auto pick = [&](auto layout) -> AdamSegmentFn {
    using L = decltype(layout);
    if constexpr (compiled_here<L>()) {
      return pick_adam_wd<typename L::Param, typename L::State, L::kStore>(wd_mode, amsgrad, maximize);
    } else {
      return kernels_avx512()->adam(l, wd_mode, amsgrad, maximize);
    }
  };
  if (l.state_dtype == kQuant8) return quant8_layout_switch<AdamSegmentFn>(l.dtype, l.state_dtype, l.store, pick);
  return layout_switch<AdamSegmentFn>(l.dtype, l.state_dtype, l.store, pick);
}

SGDSegmentFn pick_sgd(const Layout& l, bool wd, int mom, bool maximize, bool first) {
  auto pick = [&](auto layout) -> SGDSegmentFn {
    using L = decltype(layout);
    if constexpr (compiled_here<L>()) {
      return pick_sgd_wd<typename L::Param, typename L::State, L::kStore>(wd, mom, maximize, first);
    } else {
      return kernels_avx512()->sgd(l, wd, mom, maximize, first);
    }
  };
  if (l.state_dtype == kQuant8) return quant8_layout_switch<SGDSegmentFn>(l.dtype, l.state_dtype, l.store, pick);
  return layout_switch<SGDSegmentFn>(l.dtype, l.state_dtype, l.store, pick);
}

// One chunk of the grad-norm reduction (Note [precision options]): squares
// in double (exact for fp32 inputs) into kNormLanes accumulators by index.
template <class S>
double norm_chunk(const void* grad, int64_t begin, int64_t end) {
  const S* g = static_cast<const S*>(grad);
  double lanes[kNormLanes] = {};
  int64_t i = begin;
#if FUSEDOPTIM_ISA >= 1
  static_assert(kNormLanes == 16, "four AVX2 accumulators of four lanes");
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (; i + 16 <= end; i += 16) {
    // A read-only pass has no stores to overlap with: ask for the lines
    // 1 KB ahead so that more misses are in flight than the prefetcher keeps.
    __builtin_prefetch(reinterpret_cast<const char*>(g + i) + 1024);
    FO_UNROLL_CPU
    for (int h = 0; h < 2; ++h) {
      const __m256 x = VecAVX2::load(g + i + 8 * h).x;
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      // fma(x, x, acc) == acc + x * x here: the square of an fp32 value is
      // exact in double, so rounding it first changes nothing.
      acc[2 * h] = _mm256_fmadd_pd(lo, lo, acc[2 * h]);
      acc[2 * h + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * h + 1]);
    }
  }
  for (int h = 0; h < 4; ++h) _mm256_storeu_pd(lanes + 4 * h, acc[h]);
#endif
  for (; i < end; ++i) {
    const double x = double(VecScalar::load(g + i).x);
    lanes[(i - begin) % kNormLanes] += x * x;
  }
  return norm_lanes_sum(lanes);
}

NormChunkFn pick_norm(int32_t dtype) {
  switch (dtype) {
    case kFloat32: return &norm_chunk<float>;
    case kBFloat16: return &norm_chunk<bf16_t>;
    case kFloat16: return &norm_chunk<f16_t>;
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

#if FUSEDOPTIM_ISA >= 1
// The probe with streaming stores, 32 bytes at a time where every
// read-write stream is 32-byte aligned at the same element (torch's
// allocations and the chunk split are), plain stores elsewhere.
template <class S, int kRW>
void probe_nt_segment(void* const* rw, const void* r, int64_t begin, int64_t end) {
  using T = typename ProbeLane<S>::type;
  constexpr int64_t W = 32 / int64_t(sizeof(T));
  const T* __restrict g = static_cast<const T*>(r);
  T* x[kRW];
  for (int k = 0; k < kRW; ++k) x[k] = static_cast<T*>(rw[k]);
  const auto aligned = [&](int64_t i) {
    for (int k = 0; k < kRW; ++k) {
      if (reinterpret_cast<uintptr_t>(x[k] + i) % 32 != 0) return false;
    }
    return true;
  };
  int64_t i = begin;
  for (; i < end && !aligned(i); ++i) {
    for (int k = 0; k < kRW; ++k) x[k][i] = T(x[k][i] + g[i]);
  }
  if (aligned(i)) {
    for (; i + W <= end; i += W) {
      const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i));
      for (int k = 0; k < kRW; ++k) {
        __m256i* to = reinterpret_cast<__m256i*>(x[k] + i);
        const __m256i xv = _mm256_load_si256(to);
        if constexpr (std::is_same_v<T, float>) {
          _mm256_stream_si256(to, _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(xv), _mm256_castsi256_ps(gv))));
        } else {
          _mm256_stream_si256(to, _mm256_add_epi16(xv, gv));
        }
      }
    }
  }
  for (; i < end; ++i) {
    for (int k = 0; k < kRW; ++k) x[k][i] = T(x[k][i] + g[i]);
  }
  _mm_sfence();  // the streaming stores are done before the call returns
}
#define FO_PROBE_NT(S, n) &probe_nt_segment<S, n>
#else
#define FO_PROBE_NT(S, n) &probe_segment<S, n>
#endif

template <class S>
ProbeSegmentFn pick_probe_rw(int nrw, bool nontemporal) {
  switch (nrw) {
    case 1: return nontemporal ? FO_PROBE_NT(S, 1) : &probe_segment<S, 1>;
    case 2: return nontemporal ? FO_PROBE_NT(S, 2) : &probe_segment<S, 2>;
    case 3: return nontemporal ? FO_PROBE_NT(S, 3) : &probe_segment<S, 3>;
    case 4: return nontemporal ? FO_PROBE_NT(S, 4) : &probe_segment<S, 4>;
    default: return nullptr;
  }
}

ProbeSegmentFn pick_probe(int32_t dtype, int nrw, bool nontemporal) {
  switch (dtype) {
    case kFloat32: return pick_probe_rw<float>(nrw, nontemporal);
    case kBFloat16: return pick_probe_rw<bf16_t>(nrw, nontemporal);
    case kFloat16: return pick_probe_rw<f16_t>(nrw, nontemporal);
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

const KernelTable kTable = {FO_STR(FO_VARIANT), VecISA::kWidth, &pick_adam, &pick_sgd, &pick_probe, &triad_segment,
                            &pick_norm};

}  // namespace

const KernelTable* FO_CAT(kernels_, FO_VARIANT)() { return &kTable; }

}  // namespace cpu
}  // namespace fusedoptim
