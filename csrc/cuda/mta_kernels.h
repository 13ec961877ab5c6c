// The kernels of multi-tensor apply: Adam, AdamW and SGD updates, the step
// counter increment and the grad-norm reduction.
//
// Device code that compiles two ways: with nvcc for GPUs (kernels.cu), and
// with a host compiler after emulation.h (emulated.cpp), which runs the very
// same kernels on the CPU for tests.
//
// Note [multi-tensor apply]
// One launch updates up to N tensors (N = 448 for Adam, 672 for SGD with
// the large parameter block). The tensors are laid end to end in a virtual
// flat list, each starting at a multiple of kPad elements; block b updates
// elements [b * kChunk, (b + 1) * kChunk) of that list, whatever tensors they
// belong to, so a block walks over as many small tensors (biases, norms) as
// fit in its chunk instead of idling on one, and a large tensor is cut into
// many blocks. The block finds its first tensor by binary search over the
// start offsets in the parameter block: the block-to-(tensor, chunk) map is
// computed, not stored, so a launch carries any number of blocks.
//
// Inside a tensor, each thread moves 8 elements of every stream per packet
// iteration (a Slice, device_math.h): one 16-byte packet of a 16-bit format,
// two of fp32. Where every stream is fp32 (the fp32 layout) the two packets
// are kBlockThreads packets apart (kILP = 2, as before the precision
// options); where a layout mixes fp32 and 16-bit streams (fp32 params with
// bf16 states, bf16/fp16 params with fp32 master and states) a thread's
// fp32 packets are adjacent, so that the 8 elements are the same in every
// stream. The elements before the first element at which every stream is
// 16-byte aligned, after the last whole slice, and all of a tensor whose
// streams cannot be aligned together take the one-element path. Both paths
// (written once for both optimizers, Note [update ops]) call the same
// per-element function (adam_elem / sgd_elem), which runs
// adam_update/sgd_update of update_math.h and stores as the store mode says
// (common/store.h, Note [precision options] in common/precision.h).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../common/coeffs.h"
#include "../common/macros.h"
#include "../common/params.h"
#include "../common/precision.h"
#include "../common/quant8.h"
#include "../common/store.h"
#include "../common/update_math.h"
#include "device_math.h"
#include "param_blocks.h"

#if defined(__CUDACC__)
#define FO_UNROLL _Pragma("unroll")
#else
#define FO_UNROLL
#endif

namespace fusedoptim {
namespace cuda {


// The last tensor whose flat start is <= pos (starts are sorted, start[0] == 0).
FO_DEVICE int find_tensor(const int64_t* start, int count, int64_t pos) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (start[mid] <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// f(t, b, e) for each tensor t of a launch with elements [b, e) in this
// block's chunk of the flat list (Note [multi-tensor apply]).
template <class Args, class F>
FO_DEVICE void for_each_in_chunk(const Args& a, F&& f) {
  const int64_t lo = int64_t(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk;
  for (int t = find_tensor(a.start, a.h.count, lo); t < a.h.count && a.start[t] < hi; ++t) {
    const int64_t b = lo > a.start[t] ? lo - a.start[t] : 0;
    const int64_t e = hi - a.start[t] < a.slot[t].numel ? hi - a.start[t] : a.slot[t].numel;
    if (b < e) f(t, b, e);
  }
}

// Bias corrections from a device step counter, once per (block, tensor).
// Not inlined: its double-precision division and square root call
// subroutines, and inlined into the larger kernels (bf16 params with fp32
// master and amsgrad) the values live across those calls spilled.
#if defined(__CUDACC__)
__device__ __noinline__
#else
inline
#endif
AdamCoeffs device_coeffs(double lr, double beta1, double beta2, const float* step) {
  return adam_coeffs(lr, beta1, beta2, double(*step));
}

// AMP: grad / scale, rounded to the grad's dtype and written back, as
// torch's unscale (_foreach_div_) followed by the update would do.
template <class S>
FO_DEVICE float unscaled(float g, float scale) {
  return to_float(from_float<S>(__fdiv_rn(g, scale)));
}

// The streams of a (param S, state T, store) layout.
template <class S, class T, int kStore>
struct LayoutOf {
  static constexpr bool kExtra = kStore == kStoreMaster || kStore == kStoreKahan;
  using Extra = typename std::conditional<kStore == kStoreMaster, float, S>::type;
  static constexpr bool kReadParam = kStore != kStoreMaster;  // master: the update starts from the master
  static constexpr int kWidth = sizeof(S) == 4 && sizeof(T) == 4 ? 4 : 8;  // elements per Slice
  static constexpr int kILP = kWidth == 4 ? 2 : 1;                          // Slices in flight
  // The stream whose alignment decides where packets start: a 16-bit one if any.
  static constexpr bool kRefIsState = sizeof(S) == 4 && sizeof(T) == 2;
  static constexpr int kRefSize = kRefIsState ? int(sizeof(T)) : int(sizeof(S));
};

// Whether a stream of element size `size` at p is 16-byte aligned `h`
// elements after a multiple of kPad (where every stream is as misaligned as
// at its first element).
FO_DEVICE bool aligned_at(const void* p, int size, int64_t h) {
  return ((reinterpret_cast<uintptr_t>(p) & 15u) + uint64_t(h) * unsigned(size)) % 16u == 0;
}

FO_DEVICE int64_t head_of(const void* p, int size) {
  return int64_t((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / size;
}

// Elements [b, e) of one tensor -> one-element head [b, vb), slices
// [vb, vb + nvec * W), one-element tail. head = the offset of the first
// aligned element of the reference stream, -1 if the streams cannot align.
template <int W>
FO_DEVICE void split_segment(int64_t head, int64_t b, int64_t e, int64_t* vb, int64_t* nvec) {
  if (head < 0) {
    *vb = e;
    *nvec = 0;
    return;
  }
  *vb = b + head < e ? b + head : e;
  *nvec = (e - *vb) / W;
}

// Launch-wide values of one block, as the per-element code uses them.
struct Ctx {
  float scale;     // AMP grad scale (used when unscale)
  float gmul;      // grad multiplier: *clip_coef or 1
  uint32_t key;    // stochastic rounding: the tensor's key at this step
  bool unscale;
  bool maximize;

  FO_DEVICE explicit Ctx(const Uniform& u)
      : scale(u.grad_scale != nullptr ? *u.grad_scale : 1.0f),
        gmul(u.clip_coef != nullptr ? *u.clip_coef : 1.0f),
        key(0),
        unscale(u.grad_scale != nullptr),
        maximize(u.maximize != 0) {}
};

// The grad as the update takes it: unscaled (AMP; `g` keeps the value that
// is written back), times the multiplier, negated for maximize. The update
// itself then runs with grad_mul = 1 and kMaximize = false: multiplying by
// 1 is exact, so this is bit for bit update_math.h's g * grad_mul, -g.
template <class S>
FO_DEVICE VecF grad_in(float& g, const Ctx& k) {
  if (k.unscale) g = unscaled<S>(g, k.scale);
  VecF gv = mul(VecF(g), VecF(k.gmul));
  if (k.maximize) gv = neg(gv);
  return gv;
}

// One element's param and extra stream as fp32 values in registers (p: the
// stored param, exact in S where the store mode rounds itself; e: the extra
// stream), as the store modes of common/store.h read and write them.
struct ElemAt {
  float& p;
  float& e;
  int64_t i;
  uint32_t key;  // stochastic rounding: the tensor's key

  FO_DEVICE VecF load_param() const { return VecF(p); }
  FO_DEVICE VecF load_extra() const { return VecF(e); }
  FO_DEVICE void param(VecF v) const { p = v.x; }
  FO_DEVICE void param_sr(VecF v) const {
    const uint32_t key_hi = sr_key_hi(key, uint32_t(uint64_t(i) >> 32));
    p = bf16_to_float(float_to_bf16_sr(v.x, sr_bits(key_hi, uint32_t(uint64_t(i)))));
  }
  FO_DEVICE void extra(VecF v) const { e = v.x; }
};

// One Adam element (index i of its tensor), all values as fp32: p is the
// stored param (unused with kStoreMaster), e the extra stream's value.
template <class S, int kStore, int kWD, bool kAms, bool kFoldBC2 = false>
FO_DEVICE void adam_elem(float& p, float& e, float& g, float& m, float& v, float& x, int64_t i, const Ctx& k,
                         const AdamConsts<VecF>& c) {
  const VecF gv = grad_in<S>(g, k);
  const ElemAt io{p, e, i, k.key};
  const VecF p0 = start_param<kStore, VecF>(io);
  VecF pv = p0, mv(m), vv(v), xv(x);
  adam_update<kWD, kAms, false, kFoldBC2>(pv, gv, mv, vv, xv, c);
  m = mv.x;
  v = vv.x;
  x = xv.x;
  store_param<S, kStore>(io, p0, pv);
}

// Note [update ops]
// The per-element loop of the updates is written once, over an Op that
// says what differs between Adam and SGD: its layout (S, T, kStore), its
// state streams (up to kStates streams of T: stream j is loaded when
// read(j) and stored when write(j); state(slot, j) is its address) and the
// element function elem(p, e, g, states, i, ctx). one_elem, packets and
// head below keep the order of loads, stores and tests that each optimizer
// had when it was written out on its own, and a state's flags are tested
// with if constexpr (per stream index Q): ptxas allocates registers
// differently for other forms of the same code; these forms keep the
// kernels at the register counts they had (.ci/cuda-report).

// State stream Q of element i, as fp32 (0 when the update does not read it).
template <class Op, int Q, class Slot>
FO_DEVICE float load_state(const Slot& s, int64_t i) {
  if constexpr (Op::read(Q)) {
    return to_float(static_cast<typename Op::T*>(Op::state(s, Q))[i]);
  } else {
    return 0.0f;
  }
}

template <class Op, int Q, class Slot>
FO_DEVICE void store_state(const Slot& s, int64_t i, float v) {
  if constexpr (Op::write(Q)) static_cast<typename Op::T*>(Op::state(s, Q))[i] = from_float<typename Op::T>(v);
}

// One element (index i of its tensor) on the one-element path.
template <class Op, class Slot, int... Q>
FO_DEVICE void one_elem(const Slot& s, int64_t i, const Op& op, const Ctx& k, std::integer_sequence<int, Q...>) {
  using S = typename Op::S;
  using L = LayoutOf<S, typename Op::T, Op::kStore>;
  using E = typename L::Extra;
  S* p = static_cast<S*>(s.param);
  S* g = static_cast<S*>(s.grad);
  E* ex = static_cast<E*>(L::kExtra ? s.extra : nullptr);
  float pf = L::kReadParam ? to_float(p[i]) : 0.0f;
  float ef = L::kExtra ? to_float(ex[i]) : 0.0f;
  float gf = to_float(g[i]);
  float st[] = {load_state<Op, Q>(s, i)...};  // (in order: a braced list is evaluated left to right)
  op.elem(pf, ef, gf, st, i, k);
  if (k.unscale) g[i] = from_float<S>(gf);
  p[i] = from_float<S>(pf);
  if (L::kExtra) ex[i] = from_float<E>(ef);
  (store_state<Op, Q>(s, i, st[Q]), ...);
}

// The slice of state stream Q, loaded (zero where the update only writes it).
template <class Op, int Q, class X>
FO_DEVICE void load_slice(X& x, const typename Op::T* base, int64_t u) {
  if constexpr (Op::read(Q)) {
    x.load(base, u);
  } else if constexpr (Op::write(Q)) {
    x = X{};
  }
}

template <class Op, int Q, class X>
FO_DEVICE float slice_lane(const X& x, int l) {
  if constexpr (Op::read(Q)) {
    return x.get(l);
  } else {
    return 0.0f;
  }
}

template <class Op, int Q, class X>
FO_DEVICE void set_lane(X& x, int l, float v) {
  if constexpr (Op::write(Q)) x.set(l, v);
}

template <class Op, int Q, class X>
FO_DEVICE void store_slice(const X& x, typename Op::T* base, int64_t u) {
  if constexpr (Op::write(Q)) x.store(base, u);
}

template <class Op, int Q, class Slot>
FO_DEVICE typename Op::T* state_from(const Slot& s, int64_t first) {
  if constexpr (Op::write(Q)) {
    return static_cast<typename Op::T*>(Op::state(s, Q)) + first;
  } else {
    return nullptr;
  }
}

// Slices [0, nvec) from element `first` on (Note [multi-tensor apply]).
template <class Op, class Slot, int... Q>
FO_DEVICE void packets(const Slot& s, int64_t first, int64_t nvec, const Op& op, const Ctx& k,
                       std::integer_sequence<int, Q...>) {
  using S = typename Op::S;
  using T = typename Op::T;
  using L = LayoutOf<S, T, Op::kStore>;
  using E = typename L::Extra;
  constexpr int W = L::kWidth;
  constexpr int kILP = L::kILP;
  S* p = static_cast<S*>(s.param) + first;
  S* g = static_cast<S*>(s.grad) + first;
  T* st[] = {state_from<Op, Q>(s, first)...};
  E* ex = L::kExtra ? static_cast<E*>(s.extra) + first : nullptr;
  for (int64_t u0 = threadIdx.x; u0 < nvec; u0 += int64_t(kBlockThreads) * kILP) {
    Slice<S, W> P[kILP], G[kILP];
    Slice<T, W> X[Op::kStates][kILP];
    Slice<E, W> XE[kILP];
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        if (L::kReadParam) P[j].load(p, u);
        else P[j] = Slice<S, W>{};
        G[j].load(g, u);
        (load_slice<Op, Q>(X[Q][j], st[Q], u), ...);
        if (L::kExtra) XE[j].load(ex, u);
      }
    }
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        FO_UNROLL
        for (int l = 0; l < W; ++l) {
          float pf = L::kReadParam ? P[j].get(l) : 0.0f;
          float ef = L::kExtra ? XE[j].get(l) : 0.0f;
          float gf = G[j].get(l);
          float sf[] = {slice_lane<Op, Q>(X[Q][j], l)...};
          op.elem(pf, ef, gf, sf, first + u * W + l, k);
          if (k.unscale) G[j].set(l, gf);
          P[j].set(l, pf);
          if (L::kExtra) XE[j].set(l, ef);
          (set_lane<Op, Q>(X[Q][j], l, sf[Q]), ...);
        }
        P[j].store(p, u);
        (store_slice<Op, Q>(X[Q][j], st[Q], u), ...);
        if (L::kExtra) XE[j].store(ex, u);
        if (k.unscale) G[j].store(g, u);
      }
    }
  }
}

template <class Op, int Q, class Slot>
FO_DEVICE bool state_aligned(const Slot& s, int64_t h, int ts) {
  if constexpr (Op::write(Q)) {
    return aligned_at(Op::state(s, Q), ts, h);
  } else {
    return true;
  }
}

// Where the slices of a tensor start (see split_segment), -1 if its streams
// cannot be 16-byte aligned together. The reference stream is the first
// state where the layout's states are the 16-bit streams (and the update
// has states), else the param. (The test is one chain of && in this
// function, as it was when written out per optimizer: other forms of the
// same test changed ptxas's register allocation.)
template <class Op, class Slot, int... Q>
FO_DEVICE int64_t head(const Slot& s, std::integer_sequence<int, Q...>) {
  using S = typename Op::S;
  using T = typename Op::T;
  using L = LayoutOf<S, T, Op::kStore>;
  constexpr bool kRefState = L::kRefIsState && Op::write(0);
  const int64_t h = head_of(kRefState ? Op::state(s, 0) : s.param, kRefState ? int(sizeof(T)) : int(sizeof(S)));
  const int ss = int(sizeof(S)), ts = int(sizeof(T));
  const bool ok = ((aligned_at(s.param, ss, h) && aligned_at(s.grad, ss, h)) && ... && state_aligned<Op, Q>(s, h, ts)) &&
                  (!L::kExtra || aligned_at(s.extra, int(sizeof(typename L::Extra)), h));
  return ok ? h : -1;
}

// Elements [b, e) of one tensor: the one-element head, the slices, the tail.
template <class Op, class Slot>
FO_DEVICE void segment(const Slot& s, int64_t b, int64_t e, const Op& op, const Ctx& k) {
  constexpr int W = LayoutOf<typename Op::S, typename Op::T, Op::kStore>::kWidth;
  constexpr auto kStates = std::make_integer_sequence<int, Op::kStates>{};
  int64_t vb, nvec;
  split_segment<W>(head<Op>(s, kStates), b, e, &vb, &nvec);
  const int64_t ve = vb + nvec * W;
  for (int64_t i = b + threadIdx.x; i < vb; i += kBlockThreads) one_elem(s, i, op, k, kStates);
  if (nvec > 0) packets(s, vb, nvec, op, k, kStates);
  for (int64_t i = ve + threadIdx.x; i < e; i += kBlockThreads) one_elem(s, i, op, k, kStates);
}

// Adam's Op (Note [update ops]): exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad).
template <class S_, class T_, int kStore_, int kWD, bool kAms>
struct AdamOp {
  using S = S_;
  using T = T_;
  static constexpr int kStore = kStore_;
  static constexpr int kStates = 3;
  static FO_DEVICE constexpr bool read(int j) { return j < 2 || kAms; }
  static FO_DEVICE constexpr bool write(int j) { return read(j); }
  static FO_DEVICE void* state(const AdamSlot& s, int j) {
    return j == 0 ? s.exp_avg : (j == 1 ? s.exp_avg_sq : s.max_exp_avg_sq);
  }
  const AdamConsts<VecF>& c;
  FO_DEVICE void elem(float& p, float& e, float& g, float (&st)[kStates], int64_t i, const Ctx& k) const {
    adam_elem<S, kStore, kWD, kAms>(p, e, g, st[0], st[1], st[2], i, k, c);
  }
};

// The constants of the Adam update of tensor slot s: from the host
// coefficients, or from the device step counter, and with a device lr
// (capturable) the step size and AdamW's decay from it.
template <int kWD, class Slot>
FO_DEVICE AdamConsts<VecF> adam_consts(const AdamHeader& h, const Slot& s) {
  const AdamCoeffs co = h.u.device_steps
      ? device_coeffs(h.lr_ptr != nullptr ? double(*h.lr_ptr) : h.lr, h.beta1, h.beta2, s.step)
      : s.coeffs;
  AdamConsts<VecF> c(h.hyper, co);
  if (kWD == kDecoupled && h.lr_ptr != nullptr) c.decay = VecF(adamw_decay(double(*h.lr_ptr), h.weight_decay));
  return c;
}

// The launch values of tensor slot s, with its stochastic-rounding key.
// (Built after the constants, for the same reason: cached loads.)
template <int kStore, class Slot>
FO_DEVICE Ctx adam_ctx(const AdamHeader& h, const Slot& s) {
  Ctx k(h.u);
  if (kStore == kStoreStochastic) k.key = h.u.device_steps ? sr_key(h.seed, uint32_t(*s.step), s.sr) : s.sr;
  return k;
}

// The fp32 layout says minBlocksPerSM = 1 (as sgd_kernel): without it
// ptxas's occupancy heuristic spilled 8 bytes in fp32 kernels for
// sm_86/sm_89. The other layouts leave it unset (0): with 1 they took up to
// 15 more registers.
template <class S, class T, int kStore, int kWD, bool kAms, int N>
__global__ void __launch_bounds__(kBlockThreads, (sizeof(S) == 4 && sizeof(T) == 4) ? 1 : 0) adam_kernel(FO_KARG(AdamArgs<N>) a) {
  if (a.h.u.found_inf != nullptr && *a.h.u.found_inf != 0.0f) return;
  for_each_in_chunk(a, [&](int t, int64_t b, int64_t e) {
    const AdamSlot& s = a.slot[t];
    // (Per tensor rather than once per block: fewer values live across the
    // double-precision division keeps every kernel spill-free.)
    const AdamConsts<VecF> c = adam_consts<kWD>(a.h, s);
    const Ctx k = adam_ctx<kStore>(a.h, s);
    segment(s, b, e, AdamOp<S, T, kStore, kWD, kAms>{c}, k);
  });
}

// Device step counters: +1 in fp32 (torch's `step_t += 1`), skipped with found_inf.
template <class Args>
__global__ void __launch_bounds__(kBlockThreads) adam_count_kernel(FO_KARG(Args) a) {
  if (a.h.u.found_inf != nullptr && *a.h.u.found_inf != 0.0f) return;
  for (int t = int(threadIdx.x); t < a.h.count; t += kBlockThreads) {
    *a.slot[t].step = __fadd_rn(*a.slot[t].step, 1.0f);
  }
}

// One SGD element; b is the momentum buffer's value (unused on the first step).
template <class S, int kStore, bool kWD, int kMom, bool kFirst>
FO_DEVICE void sgd_elem(float& p, float& e, float& g, float& b, int64_t i, const Ctx& k, const SGDConsts<VecF>& c) {
  const VecF gv = grad_in<S>(g, k);
  const ElemAt io{p, e, i, k.key};
  const VecF p0 = start_param<kStore, VecF>(io);
  VecF pv = p0, bv(b);
  sgd_update<kWD, kMom, false, kFirst>(pv, gv, bv, c);
  b = bv.x;
  store_param<S, kStore>(io, p0, pv);
}

// SGD's Op (Note [update ops]): the momentum buffer, read unless this step
// initialises it (kFirst).
template <class S_, class T_, int kStore_, bool kWD, int kMom, bool kFirst>
struct SGDOp {
  using S = S_;
  using T = T_;
  static constexpr int kStore = kStore_;
  static constexpr int kStates = 1;
  static FO_DEVICE constexpr bool write(int) { return kMom != kNoMomentum; }
  static FO_DEVICE constexpr bool read(int j) { return write(j) && !kFirst; }
  static FO_DEVICE void* state(const SGDSlot& s, int) { return s.momentum_buffer; }
  const SGDConsts<VecF>& c;
  FO_DEVICE void elem(float& p, float& e, float& g, float (&st)[kStates], int64_t i, const Ctx& k) const {
    sgd_elem<S, kStore, kWD, kMom, kFirst>(p, e, g, st[0], i, k, c);
  }
};

// (minBlocksPerSM = 1: without it ptxas's occupancy heuristic spilled 16
// bytes in a bf16-with-master Nesterov kernel for sm_80.)
template <class S, class T, int kStore, bool kWD, int kMom, int N>
__global__ void __launch_bounds__(kBlockThreads, 1) sgd_kernel(FO_KARG(SGDArgs<N>) a) {
  if (a.h.u.found_inf != nullptr && *a.h.u.found_inf != 0.0f) return;
  const SGDConsts<VecF> c(a.h.hyper);
  Ctx k(a.h.u);
  for_each_in_chunk(a, [&](int t, int64_t b, int64_t e) {
    const SGDSlot& s = a.slot[t];
    if (kStore == kStoreStochastic) k.key = s.sr;
    if (kMom != kNoMomentum && ((a.first[t >> 5] >> (t & 31)) & 1u)) {
      segment(s, b, e, SGDOp<S, T, kStore, kWD, kMom, true>{c}, k);
    } else {
      segment(s, b, e, SGDOp<S, T, kStore, kWD, kMom, false>{c}, k);
    }
  });
}

// Note [8-bit states on CUDA]
// With 8-bit states (Note [8-bit states] in common/quant8.h) a block of the
// update kernel owns one quantization block of B elements of one tensor
// (blocks are numbered tensor after tensor; start[t] is tensor t's first).
// Its threads take elements l, l + 256, ...: they dequantize the codes,
// run the per-element update of the fp32-state kernels (adam_elem /
// sgd_elem: adam_update / sgd_update of update_math.h), store the param,
// and keep the new moments in shared memory; block_max2 finds the block's
// maxima of |x| bits (a maximum is the same in any order); then each thread
// writes the codes of its elements and thread 0 the scales. Every value is
// the CPU kernels', bit for bit.

// The maxima of a and b over the block's threads, returned to every thread.
FO_DEVICE void block_max2(uint32_t& a, uint32_t& b) {
  __shared__ uint32_t part[2][kBlockThreads];
  __shared__ uint32_t group[2][kBlockThreads / 16];
  part[0][threadIdx.x] = a;
  part[1][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.x < kBlockThreads / 16) {
    uint32_t x = 0, y = 0;
    for (int j = 0; j < 16; ++j) {
      const uint32_t u = part[0][threadIdx.x * 16 + j], w = part[1][threadIdx.x * 16 + j];
      x = u > x ? u : x;
      y = w > y ? w : y;
    }
    group[0][threadIdx.x] = x;
    group[1][threadIdx.x] = y;
  }
  __syncthreads();
  uint32_t x = 0, y = 0;
  for (int j = 0; j < kBlockThreads / 16; ++j) {
    x = group[0][j] > x ? group[0][j] : x;
    y = group[1][j] > y ? group[1][j] : y;
  }
  a = x;
  b = y;
  __syncthreads();  // part and group are free again
}

// Writes the codes of this thread's elements of x[0, n) (shared memory)
// for a block whose |x| bits have the maximum mb; returns the scale.
template <bool kSigned>
FO_DEVICE float q8_encode_shared(const float* x, int64_t n, uint32_t mb, uint8_t* codes) {
  bool encode;
  const float scale = q8_scale(mb, &encode);
  const float inv = encode ? __fdiv_rn(1.0f, scale) : 0.0f;
  for (int64_t l = threadIdx.x; l < n; l += kBlockThreads) codes[l] = encode ? q8_code<kSigned>(x[l], inv, uint32_t(l)) : uint8_t(0);
  return scale;
}

// The quantization block of a launch's block: its tensor, index and elements.
template <class Args>
struct Q8Block {
  int t;
  int64_t j, b0, n;
  FO_DEVICE explicit Q8Block(const Args& a) {
    const int64_t blk = int64_t(blockIdx.x);
    t = find_tensor(a.start, a.h.count, blk);
    const int64_t size = a.h.hyper.q8_block;
    j = blk - a.start[t];
    b0 = j * size;
    const int64_t left = a.slot[t].numel - b0;
    n = left < size ? left : size;
  }
};

template <class S, int kStore, int kWD, int N>
__global__ void __launch_bounds__(kBlockThreads) adam_q8_kernel(FO_KARG(AdamQ8Args<N>) a) {
  using L = LayoutOf<S, float, kStore>;
  using E = typename L::Extra;
  __shared__ float m_new[kQ8MaxBlock];
  __shared__ float r_new[kQ8MaxBlock];
  if (a.h.u.found_inf != nullptr && *a.h.u.found_inf != 0.0f) return;
  const Q8Block<AdamQ8Args<N>> q(a);
  const AdamQ8Slot& s = a.slot[q.t];
  const AdamConsts<VecF> c = adam_consts<kWD>(a.h, s);
  const Ctx k = adam_ctx<kStore>(a.h, s);
  S* p = static_cast<S*>(s.param) + q.b0;
  S* g = static_cast<S*>(s.grad) + q.b0;
  E* ex = L::kExtra ? static_cast<E*>(s.extra) + q.b0 : nullptr;
  uint8_t* mc = static_cast<uint8_t*>(s.exp_avg) + q.b0;
  uint8_t* vc = static_cast<uint8_t*>(s.exp_avg_sq) + q.b0;
  const VecF sm(s.exp_avg_scale[q.j]), sv(s.exp_avg_sq_scale[q.j]);
  uint32_t mmax = 0, rmax = 0;
  for (int64_t l = threadIdx.x; l < q.n; l += kBlockThreads) {
    float pf = L::kReadParam ? to_float(p[l]) : 0.0f;
    float ef = L::kExtra ? to_float(ex[l]) : 0.0f;
    float gf = to_float(g[l]);
    float m = mul(VecF(q8_signed_value(mc[l])), sm).x;
    const VecF root = mul(VecF(q8_unsigned_value(vc[l])), sv);
    float v = mul(root, root).x;
    float unused = 0.0f;
    adam_elem<S, kStore, kWD, false, true>(pf, ef, gf, m, v, unused, q.b0 + l, k, c);  // Note [folded bias correction]
    if (k.unscale) g[l] = from_float<S>(gf);
    p[l] = from_float<S>(pf);
    if (L::kExtra) ex[l] = from_float<E>(ef);
    const float r = sqrt(VecF(v)).x;  // exp_avg_sq is quantized as its root
    m_new[l] = m;
    r_new[l] = r;
    const uint32_t am = q8_abs_bits(m), ar = q8_abs_bits(r);
    mmax = am > mmax ? am : mmax;
    rmax = ar > rmax ? ar : rmax;
  }
  block_max2(mmax, rmax);
  const float ms = q8_encode_shared<true>(m_new, q.n, mmax, mc);
  const float vs = q8_encode_shared<false>(r_new, q.n, rmax, vc);
  if (threadIdx.x == 0) {
    s.exp_avg_scale[q.j] = ms;
    s.exp_avg_sq_scale[q.j] = vs;
  }
}

template <class S, int kStore, bool kWD, int kMom, int N>
__global__ void __launch_bounds__(kBlockThreads) sgd_q8_kernel(FO_KARG(SGDQ8Args<N>) a) {
  using L = LayoutOf<S, float, kStore>;
  using E = typename L::Extra;
  __shared__ float b_new[kQ8MaxBlock];
  if (a.h.u.found_inf != nullptr && *a.h.u.found_inf != 0.0f) return;
  const Q8Block<SGDQ8Args<N>> q(a);
  const SGDQ8Slot& s = a.slot[q.t];
  const SGDConsts<VecF> c(a.h.hyper);
  Ctx k(a.h.u);
  if (kStore == kStoreStochastic) k.key = s.sr;
  const bool first = (a.first[q.t >> 5] >> (q.t & 31)) & 1u;
  S* p = static_cast<S*>(s.param) + q.b0;
  S* g = static_cast<S*>(s.grad) + q.b0;
  E* ex = L::kExtra ? static_cast<E*>(s.extra) + q.b0 : nullptr;
  uint8_t* bc = static_cast<uint8_t*>(s.momentum_buffer) + q.b0;
  const VecF sb(first ? 0.0f : s.momentum_scale[q.j]);
  uint32_t bmax = 0, unused = 0;
  for (int64_t l = threadIdx.x; l < q.n; l += kBlockThreads) {
    float pf = L::kReadParam ? to_float(p[l]) : 0.0f;
    float ef = L::kExtra ? to_float(ex[l]) : 0.0f;
    float gf = to_float(g[l]);
    float b = first ? 0.0f : mul(VecF(q8_signed_value(bc[l])), sb).x;
    if (first) {
      sgd_elem<S, kStore, kWD, kMom, true>(pf, ef, gf, b, q.b0 + l, k, c);
    } else {
      sgd_elem<S, kStore, kWD, kMom, false>(pf, ef, gf, b, q.b0 + l, k, c);
    }
    if (k.unscale) g[l] = from_float<S>(gf);
    p[l] = from_float<S>(pf);
    if (L::kExtra) ex[l] = from_float<E>(ef);
    b_new[l] = b;
    const uint32_t ab = q8_abs_bits(b);
    bmax = ab > bmax ? ab : bmax;
  }
  block_max2(bmax, unused);
  const float bs = q8_encode_shared<true>(b_new, q.n, bmax, bc);
  if (threadIdx.x == 0) s.momentum_scale[q.j] = bs;
}

// Sum of one double per thread of the block, in a fixed order (16 groups of
// 16 consecutive threads, then the 16 group sums in order). Thread 0 gets
// the total; the others get 0.
FO_DEVICE double block_sum(double v) {
  __shared__ double part[kBlockThreads];
  __shared__ double group[kBlockThreads / 16];
  part[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < kBlockThreads / 16) {
    double s = 0.0;
    for (int j = 0; j < 16; ++j) s += part[threadIdx.x * 16 + j];
    group[threadIdx.x] = s;
  }
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int j = 0; j < kBlockThreads / 16; ++j) total += group[j];
  }
  return total;
}

// Stage 1 of the grad norm: block b's sum of squares over its chunk of the
// flat list, in double (the squares of fp32 values are exact), into
// partials[b]. Each thread sums its elements in index order, tensor after
// tensor; block_sum fixes the rest of the order.
template <class S, int N>
__global__ void __launch_bounds__(kBlockThreads) norm_partial_kernel(FO_KARG(NormArgs<N>) a) {
  const bool unscale = a.h.grad_scale != nullptr;
  const float scale = unscale ? *a.h.grad_scale : 1.0f;
  double acc = 0.0;
  for_each_in_chunk(a, [&](int t, int64_t b, int64_t e) {
    const S* g = static_cast<const S*>(a.slot[t].grad);
    for (int64_t i = b + threadIdx.x; i < e; i += kBlockThreads) {
      float x = to_float(g[i]);
      if (unscale) x = unscaled<S>(x, scale);
      const double d = double(x);
      acc += d * d;
    }
  });
  const double total = block_sum(acc);
  if (threadIdx.x == 0) a.h.partials[blockIdx.x] = total;
}

// Stage 2 (one block): the partials in a fixed order, then the norm and
// clip_grad_norm_'s coefficient (precision.h's clip_coef).
__global__ void __launch_bounds__(kBlockThreads) norm_final_kernel(FO_KARG(NormFinalArgs) a) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < a.count; i += kBlockThreads) acc += a.partials[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) {
    float norm = 0.0f;
    const float coef = clip_coef(total, a.max_norm, &norm);
    a.out[0] = norm;
    a.out[1] = coef;
  }
}

}  // namespace cuda
}  // namespace fusedoptim
