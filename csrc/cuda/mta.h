// Multi-tensor apply: the CUDA kernels of Adam, AdamW and SGD, and the host
// code that packs a list of tensors into launches.
//
// The file compiles two ways: with nvcc for GPUs (kernels.cu), and with a
// host compiler after emulation.h (emulated.cpp), which runs the very same
// kernels on the CPU for tests. The includer defines FO_MTA_LARGE and
// FO_MTA_SMALL (0 or 1): which parameter blocks to instantiate.
//
// Note [multi-tensor apply]
// One launch updates up to N tensors (N ~ 450 for Adam, ~670 for SGD with
// the large parameter block). The tensors are laid end to end in a virtual
// flat list, each starting at a multiple of kPad elements; block b updates
// elements [b * kChunk, (b + 1) * kChunk) of that list, whatever tensors they
// belong to, so a block walks over as many small tensors (biases, norms) as
// fit in its chunk instead of idling on one, and a large tensor is cut into
// many blocks. The block finds its first tensor by binary search over the
// start offsets in the parameter block: the block-to-(tensor, chunk) map is
// computed, not stored, so a launch carries any number of blocks.
//
// Inside a tensor, each thread moves 16-byte packets (4 fp32 or 8 16-bit
// elements) with kILP packets of every stream in flight, where all streams
// of the tensor share the same misalignment; the elements before the first
// 16-byte boundary and after the last whole packet, and tensors whose
// streams are misaligned to each other, take the one-element path. Both
// paths call adam_update/sgd_update of update_math.h.
//
// Note [kernel parameter space]
// Tensor addresses travel in the kernel's parameter block. CUDA 12.1 and
// newer toolkits, on drivers of 12.1 and newer and GPUs of compute
// capability 7.0 and up, accept 32764 bytes of kernel parameters instead of
// 4096. The large block carries ~9x more tensors per launch; the small one
// is the fallback for older drivers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>

#include "../common/adam_coeffs.h"
#include "../common/params.h"
#include "../common/update_math.h"
#include "api.h"
#include "device_math.h"

#if !defined(FO_MTA_LARGE) || !defined(FO_MTA_SMALL)
#error "define FO_MTA_LARGE and FO_MTA_SMALL before including mta.h"
#endif

#if defined(__CUDACC__)
#define FO_UNROLL _Pragma("unroll")
// Kernels take their parameter block by value; emulated ones by reference,
// which avoids a 32 KB copy per emulated thread.
#define FO_KARG(T) const T
#else
#define FO_UNROLL
#define FO_KARG(T) const T&
#endif

namespace fusedoptim {
namespace cuda {

constexpr int kBlockThreads = 256;
// 16-byte packets of each stream in flight per thread and iteration: 8
// elements per stream in either format. With 4 or 5 streams per tensor that
// is 4 to 10 independent 16-byte loads in flight per thread.
// (kILP below: 2 for fp32, 1 for 16-bit formats.)
constexpr int64_t kChunk = 8192;       // elements of the flat list per block
constexpr int64_t kPad = 8;            // tensors start at multiples of 8 elements (16 or 32 bytes)
constexpr int kLargeParamBytes = 32764;
constexpr int kSmallParamBytes = 4096;

// ---------------------------------------------------------------------------
// Parameter blocks

struct AdamSlot {
  void* param;
  void* grad;  // written only to store AMP-unscaled grads
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* step;  // device_steps only
  int64_t numel;
  AdamCoeffs coeffs;  // host steps only
};

struct AdamHeader {
  AdamHyper hyper;
  double lr, beta1, beta2, weight_decay;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  int32_t count;
  int32_t device_steps;
};

template <int N>
struct AdamArgs {
  static constexpr int kCapacity = N;
  AdamHeader h;
  int64_t start[N];  // offsets in the flat list, multiples of kPad
  AdamSlot slot[N];
};

struct SGDSlot {
  void* param;
  void* grad;
  void* momentum_buffer;
  int64_t numel;
  int32_t first;  // buffer not initialised yet: buf = grad
  int32_t pad_;
};

struct SGDHeader {
  SGDHyper hyper;
  const float* grad_scale;
  const float* found_inf;
  int32_t count;
  int32_t pad_;
};

template <int N>
struct SGDArgs {
  static constexpr int kCapacity = N;
  SGDHeader h;
  int64_t start[N];
  SGDSlot slot[N];
};

using AdamArgsLarge = AdamArgs<448>;
using AdamArgsSmall = AdamArgs<48>;
using SGDArgsLarge = SGDArgs<672>;
using SGDArgsSmall = SGDArgs<80>;
static_assert(sizeof(AdamSlot) == 64, "AdamSlot layout");
static_assert(sizeof(AdamArgsLarge) <= kLargeParamBytes, "Adam large parameter block");
static_assert(sizeof(AdamArgsSmall) <= kSmallParamBytes, "Adam small parameter block");
static_assert(sizeof(SGDArgsLarge) <= kLargeParamBytes, "SGD large parameter block");
static_assert(sizeof(SGDArgsSmall) <= kSmallParamBytes, "SGD small parameter block");

// ---------------------------------------------------------------------------
// Device code

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

// Bias corrections from a device step counter, once per (block, tensor).
FO_DEVICE AdamCoeffs device_coeffs(double lr, double beta1, double beta2, const float* step) {
  return adam_coeffs(lr, beta1, beta2, double(*step));
}

// AMP: grad / scale, rounded to the grad's dtype and written back, as
// torch's unscale (_foreach_div_) followed by the update would do.
template <class S>
FO_DEVICE float unscaled(float g, float scale) {
  return to_float(from_float<S>(__fdiv_rn(g, scale)));
}

// Whether every stream shares the param's misalignment to 16 bytes.
FO_DEVICE bool same_alignment(const void* a, const void* b) {
  return (reinterpret_cast<uintptr_t>(a) & 15u) == (reinterpret_cast<uintptr_t>(b) & 15u);
}

// Elements [b, e) of one tensor -> one-element head [b, vb), packets
// [vb, vb + nvec * W), one-element tail. b is a multiple of kPad, so the
// element at b is as misaligned as the tensor's first.
template <class S>
FO_DEVICE void split_segment(const void* base, bool vec_ok, int64_t b, int64_t e, int64_t* vb, int64_t* nvec) {
  constexpr int W = Lanes<S>::kCount;
  if (!vec_ok) {
    *vb = e;
    *nvec = 0;
    return;
  }
  const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(base) & 15u);
  const int64_t head = ((16 - mis) & 15) / int64_t(sizeof(S));
  *vb = b + head < e ? b + head : e;
  *nvec = (e - *vb) / W;
}

template <class S, int kWD, bool kAms, bool kMax>
FO_DEVICE void adam_one(const AdamSlot& s, int64_t i, const AdamConsts<VecF>& c, const float* grad_scale) {
  S* p = static_cast<S*>(s.param);
  S* g = static_cast<S*>(s.grad);
  S* m = static_cast<S*>(s.exp_avg);
  S* v = static_cast<S*>(s.exp_avg_sq);
  S* x = static_cast<S*>(s.max_exp_avg_sq);
  VecF pv(to_float(p[i])), gv(to_float(g[i])), mv(to_float(m[i])), vv(to_float(v[i]));
  VecF xv(kAms ? to_float(x[i]) : 0.0f);
  if (grad_scale != nullptr) {
    gv = VecF(unscaled<S>(gv.x, *grad_scale));
    g[i] = from_float<S>(gv.x);
  }
  adam_update<kWD, kAms, kMax>(pv, gv, mv, vv, xv, c);
  p[i] = from_float<S>(pv.x);
  m[i] = from_float<S>(mv.x);
  v[i] = from_float<S>(vv.x);
  if (kAms) x[i] = from_float<S>(xv.x);
}

template <class S, int kWD, bool kAms, bool kMax>
FO_DEVICE void adam_packets(const AdamSlot& s, int64_t first, int64_t nvec, const AdamConsts<VecF>& c,
                            const float* grad_scale) {
  using L = Lanes<S>;
  constexpr int kILP = sizeof(S) == 4 ? 2 : 1;
  Pack16* p = reinterpret_cast<Pack16*>(static_cast<S*>(s.param) + first);
  Pack16* g = reinterpret_cast<Pack16*>(static_cast<S*>(s.grad) + first);
  Pack16* m = reinterpret_cast<Pack16*>(static_cast<S*>(s.exp_avg) + first);
  Pack16* v = reinterpret_cast<Pack16*>(static_cast<S*>(s.exp_avg_sq) + first);
  Pack16* x = kAms ? reinterpret_cast<Pack16*>(static_cast<S*>(s.max_exp_avg_sq) + first) : nullptr;
  const bool unscale = grad_scale != nullptr;
  const float scale = unscale ? *grad_scale : 1.0f;
  for (int64_t u0 = threadIdx.x; u0 < nvec; u0 += int64_t(kBlockThreads) * kILP) {
    Pack16 P[kILP], G[kILP], M[kILP], V[kILP], X[kILP];
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        P[j] = p[u];
        G[j] = g[u];
        M[j] = m[u];
        V[j] = v[u];
        if (kAms) X[j] = x[u];
      }
    }
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        FO_UNROLL
        for (int l = 0; l < L::kCount; ++l) {
          VecF pv(L::get(P[j], l)), gv(L::get(G[j], l)), mv(L::get(M[j], l)), vv(L::get(V[j], l));
          VecF xv(kAms ? L::get(X[j], l) : 0.0f);
          if (unscale) {
            gv = VecF(unscaled<S>(gv.x, scale));
            L::set(G[j], l, gv.x);
          }
          adam_update<kWD, kAms, kMax>(pv, gv, mv, vv, xv, c);
          L::set(P[j], l, pv.x);
          L::set(M[j], l, mv.x);
          L::set(V[j], l, vv.x);
          if (kAms) L::set(X[j], l, xv.x);
        }
        p[u] = P[j];
        m[u] = M[j];
        v[u] = V[j];
        if (kAms) x[u] = X[j];
        if (unscale) g[u] = G[j];
      }
    }
  }
}

template <class S, int kWD, bool kAms, bool kMax, int N>
__global__ void __launch_bounds__(kBlockThreads) adam_kernel(FO_KARG(AdamArgs<N>) a) {
  if (a.h.found_inf != nullptr && *a.h.found_inf != 0.0f) return;
  const int64_t lo = int64_t(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk;
  for (int t = find_tensor(a.start, a.h.count, lo); t < a.h.count && a.start[t] < hi; ++t) {
    const AdamSlot& s = a.slot[t];
    const int64_t b = lo > a.start[t] ? lo - a.start[t] : 0;
    const int64_t e = hi - a.start[t] < s.numel ? hi - a.start[t] : s.numel;
    if (b >= e) continue;
    // With a device lr (capturable), the step size and AdamW's decay come
    // from it. (Read here rather than once per block: fewer values live
    // across the double-precision division keeps every kernel spill-free.)
    const AdamCoeffs co = a.h.device_steps
        ? device_coeffs(a.h.lr_ptr != nullptr ? double(*a.h.lr_ptr) : a.h.lr, a.h.beta1, a.h.beta2, s.step)
        : s.coeffs;
    AdamConsts<VecF> c(a.h.hyper, co);
    if (kWD == kDecoupled && a.h.lr_ptr != nullptr) c.decay = VecF(adamw_decay(double(*a.h.lr_ptr), a.h.weight_decay));
    bool vec_ok = same_alignment(s.param, s.grad) && same_alignment(s.param, s.exp_avg) &&
                  same_alignment(s.param, s.exp_avg_sq) && (!kAms || same_alignment(s.param, s.max_exp_avg_sq));
    int64_t vb, nvec;
    split_segment<S>(s.param, vec_ok, b, e, &vb, &nvec);
    const int64_t ve = vb + nvec * Lanes<S>::kCount;
    for (int64_t i = b + threadIdx.x; i < vb; i += kBlockThreads) adam_one<S, kWD, kAms, kMax>(s, i, c, a.h.grad_scale);
    if (nvec > 0) adam_packets<S, kWD, kAms, kMax>(s, vb, nvec, c, a.h.grad_scale);
    for (int64_t i = ve + threadIdx.x; i < e; i += kBlockThreads) adam_one<S, kWD, kAms, kMax>(s, i, c, a.h.grad_scale);
  }
}

// Device step counters: +1 in fp32 (torch's `step_t += 1`), skipped with found_inf.
template <int N>
__global__ void __launch_bounds__(kBlockThreads) adam_count_kernel(FO_KARG(AdamArgs<N>) a) {
  if (a.h.found_inf != nullptr && *a.h.found_inf != 0.0f) return;
  for (int t = int(threadIdx.x); t < a.h.count; t += kBlockThreads) {
    *a.slot[t].step = __fadd_rn(*a.slot[t].step, 1.0f);
  }
}

template <class S, bool kWD, int kMom, bool kMax, bool kFirst>
FO_DEVICE void sgd_one(const SGDSlot& s, int64_t i, const SGDConsts<VecF>& c, const float* grad_scale) {
  S* p = static_cast<S*>(s.param);
  S* g = static_cast<S*>(s.grad);
  S* buf = static_cast<S*>(s.momentum_buffer);
  VecF pv(to_float(p[i])), gv(to_float(g[i]));
  VecF bv((kMom != kNoMomentum && !kFirst) ? to_float(buf[i]) : 0.0f);
  if (grad_scale != nullptr) {
    gv = VecF(unscaled<S>(gv.x, *grad_scale));
    g[i] = from_float<S>(gv.x);
  }
  sgd_update<kWD, kMom, kMax, kFirst>(pv, gv, bv, c);
  p[i] = from_float<S>(pv.x);
  if (kMom != kNoMomentum) buf[i] = from_float<S>(bv.x);
}

template <class S, bool kWD, int kMom, bool kMax, bool kFirst>
FO_DEVICE void sgd_packets(const SGDSlot& s, int64_t first, int64_t nvec, const SGDConsts<VecF>& c,
                           const float* grad_scale) {
  using L = Lanes<S>;
  constexpr int kILP = sizeof(S) == 4 ? 2 : 1;
  constexpr bool kBuf = kMom != kNoMomentum;
  Pack16* p = reinterpret_cast<Pack16*>(static_cast<S*>(s.param) + first);
  Pack16* g = reinterpret_cast<Pack16*>(static_cast<S*>(s.grad) + first);
  Pack16* buf = kBuf ? reinterpret_cast<Pack16*>(static_cast<S*>(s.momentum_buffer) + first) : nullptr;
  const bool unscale = grad_scale != nullptr;
  const float scale = unscale ? *grad_scale : 1.0f;
  for (int64_t u0 = threadIdx.x; u0 < nvec; u0 += int64_t(kBlockThreads) * kILP) {
    Pack16 P[kILP], G[kILP], B[kILP];
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        P[j] = p[u];
        G[j] = g[u];
        if (kBuf && !kFirst) B[j] = buf[u];
      }
    }
    FO_UNROLL
    for (int j = 0; j < kILP; ++j) {
      const int64_t u = u0 + int64_t(j) * kBlockThreads;
      if (u < nvec) {
        FO_UNROLL
        for (int l = 0; l < L::kCount; ++l) {
          VecF pv(L::get(P[j], l)), gv(L::get(G[j], l));
          VecF bv((kBuf && !kFirst) ? L::get(B[j], l) : 0.0f);
          if (unscale) {
            gv = VecF(unscaled<S>(gv.x, scale));
            L::set(G[j], l, gv.x);
          }
          sgd_update<kWD, kMom, kMax, kFirst>(pv, gv, bv, c);
          L::set(P[j], l, pv.x);
          if (kBuf) L::set(B[j], l, bv.x);
        }
        p[u] = P[j];
        if (kBuf) buf[u] = B[j];
        if (unscale) g[u] = G[j];
      }
    }
  }
}

template <class S, bool kWD, int kMom, bool kMax, bool kFirst>
FO_DEVICE void sgd_segment(const SGDSlot& s, int64_t b, int64_t e, const SGDConsts<VecF>& c, const float* grad_scale) {
  const bool vec_ok = same_alignment(s.param, s.grad) &&
                      (kMom == kNoMomentum || same_alignment(s.param, s.momentum_buffer));
  int64_t vb, nvec;
  split_segment<S>(s.param, vec_ok, b, e, &vb, &nvec);
  const int64_t ve = vb + nvec * Lanes<S>::kCount;
  for (int64_t i = b + threadIdx.x; i < vb; i += kBlockThreads) sgd_one<S, kWD, kMom, kMax, kFirst>(s, i, c, grad_scale);
  if (nvec > 0) sgd_packets<S, kWD, kMom, kMax, kFirst>(s, vb, nvec, c, grad_scale);
  for (int64_t i = ve + threadIdx.x; i < e; i += kBlockThreads) sgd_one<S, kWD, kMom, kMax, kFirst>(s, i, c, grad_scale);
}

template <class S, bool kWD, int kMom, bool kMax, int N>
__global__ void __launch_bounds__(kBlockThreads) sgd_kernel(FO_KARG(SGDArgs<N>) a) {
  if (a.h.found_inf != nullptr && *a.h.found_inf != 0.0f) return;
  const SGDConsts<VecF> c(a.h.hyper);
  const int64_t lo = int64_t(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk;
  for (int t = find_tensor(a.start, a.h.count, lo); t < a.h.count && a.start[t] < hi; ++t) {
    const SGDSlot& s = a.slot[t];
    const int64_t b = lo > a.start[t] ? lo - a.start[t] : 0;
    const int64_t e = hi - a.start[t] < s.numel ? hi - a.start[t] : s.numel;
    if (b >= e) continue;
    if (kMom != kNoMomentum && s.first) {
      sgd_segment<S, kWD, kMom, kMax, true>(s, b, e, c, a.h.grad_scale);
    } else {
      sgd_segment<S, kWD, kMom, kMax, false>(s, b, e, c, a.h.grad_scale);
    }
  }
}

// ---------------------------------------------------------------------------
// Host code: runtime flags -> a kernel instantiation, tensors -> launches.

template <int N>
using AdamKernel = void (*)(FO_KARG(AdamArgs<N>));
template <int N>
using SGDKernel = void (*)(FO_KARG(SGDArgs<N>));

template <int N, class S, int kWD, bool kAms>
AdamKernel<N> pick_adam_max(bool maximize) {
  return maximize ? &adam_kernel<S, kWD, kAms, true, N> : &adam_kernel<S, kWD, kAms, false, N>;
}
template <int N, class S, int kWD>
AdamKernel<N> pick_adam_ams(bool amsgrad, bool maximize) {
  return amsgrad ? pick_adam_max<N, S, kWD, true>(maximize) : pick_adam_max<N, S, kWD, false>(maximize);
}
template <int N, class S>
AdamKernel<N> pick_adam_wd(int wd, bool amsgrad, bool maximize) {
  switch (wd) {
    case kNoDecay: return pick_adam_ams<N, S, kNoDecay>(amsgrad, maximize);
    case kL2: return pick_adam_ams<N, S, kL2>(amsgrad, maximize);
    case kDecoupled: return pick_adam_ams<N, S, kDecoupled>(amsgrad, maximize);
    default: return nullptr;
  }
}
template <int N>
AdamKernel<N> pick_adam(int32_t dtype, int wd, bool amsgrad, bool maximize) {
  switch (dtype) {
    case kFloat32: return pick_adam_wd<N, float>(wd, amsgrad, maximize);
    case kBFloat16: return pick_adam_wd<N, bf16_t>(wd, amsgrad, maximize);
    case kFloat16: return pick_adam_wd<N, f16_t>(wd, amsgrad, maximize);
    default: return nullptr;
  }
}

template <int N, class S, bool kWD, int kMom>
SGDKernel<N> pick_sgd_max(bool maximize) {
  return maximize ? &sgd_kernel<S, kWD, kMom, true, N> : &sgd_kernel<S, kWD, kMom, false, N>;
}
template <int N, class S, bool kWD>
SGDKernel<N> pick_sgd_mom(int mom, bool maximize) {
  switch (mom) {
    case kNoMomentum: return pick_sgd_max<N, S, kWD, kNoMomentum>(maximize);
    case kMomentum: return pick_sgd_max<N, S, kWD, kMomentum>(maximize);
    case kNesterov: return pick_sgd_max<N, S, kWD, kNesterov>(maximize);
    default: return nullptr;
  }
}
template <int N, class S>
SGDKernel<N> pick_sgd_wd(bool wd, int mom, bool maximize) {
  return wd ? pick_sgd_mom<N, S, true>(mom, maximize) : pick_sgd_mom<N, S, false>(mom, maximize);
}
template <int N>
SGDKernel<N> pick_sgd(int32_t dtype, bool wd, int mom, bool maximize) {
  switch (dtype) {
    case kFloat32: return pick_sgd_wd<N, float>(wd, mom, maximize);
    case kBFloat16: return pick_sgd_wd<N, bf16_t>(wd, mom, maximize);
    case kFloat16: return pick_sgd_wd<N, f16_t>(wd, mom, maximize);
    default: return nullptr;
  }
}

inline int64_t padded(int64_t numel) { return (numel + kPad - 1) / kPad * kPad; }
inline int64_t blocks_for(int64_t flat) { return (flat + kChunk - 1) / kChunk; }

// Packs r's tensors into as few launches as the parameter block allows.
// Launcher provides launch(kernel, blocks, args) and throws on errors.
template <class Args, class Launcher>
LaunchStats run_adam(const AdamRequest& r, Launcher& launcher) {
  constexpr int N = Args::kCapacity;
  const AdamKernel<N> kernel = pick_adam<N>(r.common.dtype, r.wd_mode, r.amsgrad, r.maximize);
  if (kernel == nullptr) throw std::invalid_argument("adam_step: unsupported dtype or weight-decay mode");
  std::unique_ptr<Args> a(new Args());
  a->h.hyper = r.hyper;
  a->h.lr = r.lr;
  a->h.beta1 = r.beta1;
  a->h.beta2 = r.beta2;
  a->h.weight_decay = r.weight_decay;
  a->h.lr_ptr = r.lr_ptr;
  a->h.grad_scale = r.common.grad_scale;
  a->h.found_inf = r.common.found_inf;
  a->h.device_steps = r.device_steps ? 1 : 0;
  LaunchStats st;
  st.capacity = N;
  st.param_bytes = int(sizeof(Args));
  int count = 0;
  int64_t flat = 0;
  auto flush = [&] {
    if (count == 0) return;
    a->h.count = count;
    if (r.device_steps) launcher.launch(&adam_count_kernel<N>, 1, *a);
    const int64_t blocks = blocks_for(flat);
    if (blocks > 0) {
      launcher.launch(kernel, blocks, *a);
      st.launches += 1;
      st.blocks += blocks;
      st.max_tensors_per_launch = std::max(st.max_tensors_per_launch, count);
    }
    count = 0;
    flat = 0;
  };
  for (size_t k = 0; k < r.tensors.size(); ++k) {
    const AdamTensor& t = r.tensors[k];
    // An empty tensor still counts a step when the device holds the counter.
    if (t.numel == 0 && !r.device_steps) continue;
    AdamSlot& s = a->slot[count];
    s.param = t.param;
    s.grad = const_cast<void*>(t.grad);
    s.exp_avg = t.exp_avg;
    s.exp_avg_sq = t.exp_avg_sq;
    s.max_exp_avg_sq = t.max_exp_avg_sq;
    s.step = r.device_steps ? r.steps[k] : nullptr;
    s.numel = t.numel;
    s.coeffs = t.coeffs;
    a->start[count] = flat;
    flat += padded(t.numel);
    if (++count == N) flush();
  }
  flush();
  return st;
}

template <class Args, class Launcher>
LaunchStats run_sgd(const SGDRequest& r, Launcher& launcher) {
  constexpr int N = Args::kCapacity;
  const SGDKernel<N> kernel = pick_sgd<N>(r.common.dtype, r.weight_decay, r.momentum_mode, r.maximize);
  if (kernel == nullptr) throw std::invalid_argument("sgd_step: unsupported dtype or momentum mode");
  std::unique_ptr<Args> a(new Args());
  a->h.hyper = r.hyper;
  a->h.grad_scale = r.common.grad_scale;
  a->h.found_inf = r.common.found_inf;
  LaunchStats st;
  st.capacity = N;
  st.param_bytes = int(sizeof(Args));
  int count = 0;
  int64_t flat = 0;
  auto flush = [&] {
    if (count == 0) return;
    a->h.count = count;
    const int64_t blocks = blocks_for(flat);
    launcher.launch(kernel, blocks, *a);
    st.launches += 1;
    st.blocks += blocks;
    st.max_tensors_per_launch = std::max(st.max_tensors_per_launch, count);
    count = 0;
    flat = 0;
  };
  for (const SGDTensor& t : r.tensors) {
    if (t.numel == 0) continue;
    SGDSlot& s = a->slot[count];
    s.param = t.param;
    s.grad = const_cast<void*>(t.grad);
    s.momentum_buffer = t.momentum_buffer;
    s.numel = t.numel;
    s.first = t.first_step ? 1 : 0;
    s.pad_ = 0;
    a->start[count] = flat;
    flat += padded(t.numel);
    if (++count == N) flush();
  }
  flush();
  return st;
}

// The parameter blocks of each request type.
template <class Request>
struct BlocksOf;
template <>
struct BlocksOf<AdamRequest> {
  using Large = AdamArgsLarge;
  using Small = AdamArgsSmall;
};
template <>
struct BlocksOf<SGDRequest> {
  using Large = SGDArgsLarge;
  using Small = SGDArgsSmall;
};

template <class Args, class Launcher>
LaunchStats run(const AdamRequest& r, Launcher& launcher) { return run_adam<Args>(r, launcher); }
template <class Args, class Launcher>
LaunchStats run(const SGDRequest& r, Launcher& launcher) { return run_sgd<Args>(r, launcher); }

// The parameter block a request gets: the large one unless the request or
// the driver asks for the small one.
template <class Request, class Launcher>
LaunchStats dispatch(const Request& r, Launcher& launcher, bool large_ok) {
  const bool large = r.common.space == ParamSpace::kLarge || (r.common.space == ParamSpace::kAuto && large_ok);
#if FO_MTA_LARGE
  if (large) return run<typename BlocksOf<Request>::Large>(r, launcher);
#endif
#if FO_MTA_SMALL
  if (!large) return run<typename BlocksOf<Request>::Small>(r, launcher);
#endif
  throw std::runtime_error(std::string("this build has no CUDA kernels for the ") + (large ? "large" : "small") +
                           " kernel parameter block");
}

}  // namespace cuda
}  // namespace fusedoptim
