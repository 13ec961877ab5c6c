// Launching the multi-tensor kernels: runtime flags and layout codes -> a
// kernel instantiation (the pickers), a list of tensors -> parameter blocks
// and launches (the packers), and the choice of parameter block.
//
// The includer (kernels.cu, emulated.cpp) defines FO_MTA_LARGE and
// FO_MTA_SMALL (0 or 1): which parameter blocks to instantiate; it provides
// the Launcher that runs a kernel on a GPU or on the host.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/layouts.h"
#include "../common/params.h"
#include "../common/quant8.h"
#include "api.h"
#include "mta_kernels.h"
#include "param_blocks.h"

#if !defined(FO_MTA_LARGE) || !defined(FO_MTA_SMALL)
#error "define FO_MTA_LARGE and FO_MTA_SMALL before including launch.h"
#endif

namespace fusedoptim {
namespace cuda {

template <int N>
using AdamKernel = void (*)(FO_KARG(AdamArgs<N>));
template <int N>
using SGDKernel = void (*)(FO_KARG(SGDArgs<N>));

template <int N, class S, class T, int kStore, int kWD>
AdamKernel<N> pick_adam_ams(bool amsgrad) {
  return amsgrad ? &adam_kernel<S, T, kStore, kWD, true, N> : &adam_kernel<S, T, kStore, kWD, false, N>;
}

template <int N, class S, class T, int kStore>
AdamKernel<N> pick_adam_wd(int wd, bool amsgrad) {
  switch (wd) {
    case kNoDecay: return pick_adam_ams<N, S, T, kStore, kNoDecay>(amsgrad);
    case kL2: return pick_adam_ams<N, S, T, kStore, kL2>(amsgrad);
    case kDecoupled: return pick_adam_ams<N, S, T, kStore, kDecoupled>(amsgrad);
    default: return nullptr;
  }
}

template <int N, class S, class T, int kStore, bool kWD>
SGDKernel<N> pick_sgd_mom(int mom) {
  switch (mom) {
    case kNoMomentum: return &sgd_kernel<S, T, kStore, kWD, kNoMomentum, N>;
    case kMomentum: return &sgd_kernel<S, T, kStore, kWD, kMomentum, N>;
    case kNesterov: return &sgd_kernel<S, T, kStore, kWD, kNesterov, N>;
    default: return nullptr;
  }
}

// One instantiation per layout of common/layouts.h.
template <int N>
AdamKernel<N> pick_adam(const LaunchCommon& co, int wd, bool amsgrad) {
  return layout_switch<AdamKernel<N>>(co.dtype, co.state_dtype, co.store, [&](auto layout) {
    using L = decltype(layout);
    return pick_adam_wd<N, typename L::Param, typename L::State, L::kStore>(wd, amsgrad);
  });
}

template <int N>
SGDKernel<N> pick_sgd(const LaunchCommon& co, bool wd, int mom) {
  return layout_switch<SGDKernel<N>>(co.dtype, co.state_dtype, co.store, [&](auto layout) {
    using L = decltype(layout);
    using S = typename L::Param;
    using T = typename L::State;
    return wd ? pick_sgd_mom<N, S, T, L::kStore, true>(mom) : pick_sgd_mom<N, S, T, L::kStore, false>(mom);
  });
}

// 8-bit states (Note [8-bit states on CUDA]): one kernel per param layout
// and weight-decay (Adam) or momentum (SGD, with a buffer) mode.
template <int N>
using AdamQ8Kernel = void (*)(FO_KARG(AdamQ8Args<N>));
template <int N>
using SGDQ8Kernel = void (*)(FO_KARG(SGDQ8Args<N>));

template <int N>
AdamQ8Kernel<N> pick_adam_q8(const LaunchCommon& co, int wd) {
  return quant8_layout_switch<AdamQ8Kernel<N>>(co.dtype, co.state_dtype, co.store,
                                               [&](auto layout) -> AdamQ8Kernel<N> {
    using L = decltype(layout);
    using S = typename L::Param;
    switch (wd) {
      case kNoDecay: return &adam_q8_kernel<S, L::kStore, kNoDecay, N>;
      case kL2: return &adam_q8_kernel<S, L::kStore, kL2, N>;
      case kDecoupled: return &adam_q8_kernel<S, L::kStore, kDecoupled, N>;
      default: return nullptr;
    }
  });
}

template <int N>
SGDQ8Kernel<N> pick_sgd_q8(const LaunchCommon& co, bool wd, int mom) {
  return quant8_layout_switch<SGDQ8Kernel<N>>(co.dtype, co.state_dtype, co.store,
                                              [&](auto layout) -> SGDQ8Kernel<N> {
    using L = decltype(layout);
    using S = typename L::Param;
    if (mom == kMomentum) return wd ? &sgd_q8_kernel<S, L::kStore, true, kMomentum, N> : &sgd_q8_kernel<S, L::kStore, false, kMomentum, N>;
    if (mom == kNesterov) return wd ? &sgd_q8_kernel<S, L::kStore, true, kNesterov, N> : &sgd_q8_kernel<S, L::kStore, false, kNesterov, N>;
    return nullptr;
  });
}

inline int64_t padded(int64_t numel) { return (numel + kPad - 1) / kPad * kPad; }
inline int64_t blocks_for(int64_t flat) { return (flat + kChunk - 1) / kChunk; }

inline Uniform uniform_of(const LaunchCommon& c, bool maximize, bool device_steps) {
  Uniform u;
  u.grad_scale = c.grad_scale;
  u.found_inf = c.found_inf;
  u.clip_coef = c.clip_coef;
  u.maximize = maximize ? 1 : 0;
  u.device_steps = device_steps ? 1 : 0;
  return u;
}

// Fills parameter blocks of type Args tensor by tensor: each tensor starts
// at the end of the flat list (padded to kPad), and a full block is
// launched before the next tensor is added (Note [multi-tensor apply]).
template <class Args>
class Packer {
 public:
  // q8: tensors are counted in quantization blocks of q8_block elements,
  // one kernel block each (Note [8-bit states on CUDA]).
  explicit Packer(int64_t q8_block = 0) : a_(new Args()), q8_block_(q8_block) {
    stats_.capacity = Args::kCapacity;
    stats_.param_bytes = int(sizeof(Args));
  }
  Args& args() { return *a_; }
  const LaunchStats& stats() const { return stats_; }

  // The slot of the next tensor, of `numel` elements.
  int add(int64_t numel) {
    a_->start[count_] = flat_;
    flat_ += q8_block_ > 0 ? q8_blocks(numel, q8_block_) : padded(numel);
    return count_++;
  }
  bool full() const { return count_ == Args::kCapacity; }

  // Launches the tensors added since the last flush, if any: launch(blocks)
  // issues the kernels of one parameter block, whose update kernel has
  // `blocks` blocks (0: it has none to launch).
  template <class Launch>
  void flush(Launch&& launch) {
    if (count_ == 0) return;
    a_->h.count = count_;
    const int64_t blocks = q8_block_ > 0 ? flat_ : blocks_for(flat_);
    launch(blocks);
    if (blocks > 0) {
      stats_.launches += 1;
      stats_.blocks += blocks;
      stats_.max_tensors_per_launch = std::max(stats_.max_tensors_per_launch, count_);
    }
    count_ = 0;
    flat_ = 0;
  }

 private:
  std::unique_ptr<Args> a_;
  int64_t q8_block_;
  LaunchStats stats_;
  int count_ = 0;
  int64_t flat_ = 0;
};

// The fields of a slot that Adam and SGD share. `sr_word` is the
// stochastic-rounding word, stored instead of the extra stream when sr.
template <class Slot, class Tensor>
void fill_slot(Slot& s, const Tensor& t, bool sr, uint32_t sr_word) {
  s.param = t.param;
  s.grad = const_cast<void*>(t.grad);
  if (sr) {
    s.sr = sr_word;
  } else {
    s.extra = t.extra;
  }
  s.numel = t.numel;
}

// Whether Args is an 8-bit states parameter block (Note [8-bit states on CUDA]).
template <class Args>
struct IsQ8 : std::false_type {};
template <int N>
struct IsQ8<AdamQ8Args<N>> : std::true_type {};
template <int N>
struct IsQ8<SGDQ8Args<N>> : std::true_type {};

// Packs r's tensors into as few launches as the parameter block allows.
// Launcher provides launch(kernel, blocks, args) and throws on errors. With
// 8-bit states (an IsQ8 Args) the kernel synchronises its block, so it is
// a cooperative launch, one kernel block per quantization block.
template <class Args, class Launcher>
LaunchStats run_adam(const AdamRequest& r, Launcher& launcher) {
  constexpr int N = Args::kCapacity;
  constexpr bool kQ8 = IsQ8<Args>::value;
  const LaunchCommon& co = r.common;
  if (kQ8 && r.amsgrad) throw std::invalid_argument("adam_step: 8-bit states do not take amsgrad");
  if (kQ8 && !q8_block_ok(r.hyper.q8_block)) {
    throw std::invalid_argument("adam_step: 8-bit states need a valid block size");
  }
  void (*kernel)(FO_KARG(Args));
  if constexpr (kQ8) {
    kernel = pick_adam_q8<N>(co, r.wd_mode);
  } else {
    kernel = pick_adam<N>(co, r.wd_mode, r.amsgrad);
  }
  if (kernel == nullptr) throw std::invalid_argument("adam_step: unsupported layout or weight-decay mode");
  const bool sr = co.store == kStoreStochastic;
  if (sr && r.device_steps && r.tensor_ids.size() != r.tensors.size()) {
    throw std::invalid_argument("adam_step: stochastic rounding with device steps needs one tensor id per tensor");
  }
  Packer<Args> pk(kQ8 ? r.hyper.q8_block : 0);
  Args& a = pk.args();
  a.h.hyper = r.hyper;
  a.h.u = uniform_of(co, r.maximize, r.device_steps);
  a.h.lr = r.lr;
  a.h.beta1 = r.beta1;
  a.h.beta2 = r.beta2;
  a.h.weight_decay = r.weight_decay;
  a.h.lr_ptr = r.lr_ptr;
  a.h.seed = r.seed;
  auto launch = [&](int64_t blocks) {
    if (r.device_steps) launcher.launch(&adam_count_kernel<Args>, 1, a);
    if (blocks > 0) {
      if constexpr (kQ8) {
        launcher.launch_cooperative(kernel, blocks, a);
      } else {
        launcher.launch(kernel, blocks, a);
      }
    }
  };
  for (size_t k = 0; k < r.tensors.size(); ++k) {
    const AdamTensor& t = r.tensors[k];
    // An empty tensor still counts a step when the device holds the counter.
    if (t.numel == 0 && !r.device_steps) continue;
    auto& s = a.slot[pk.add(t.numel)];
    fill_slot(s, t, sr, r.device_steps ? (sr ? r.tensor_ids[k] : 0u) : t.sr_key);
    s.exp_avg = t.exp_avg;
    s.exp_avg_sq = t.exp_avg_sq;
    if constexpr (kQ8) {
      s.exp_avg_scale = t.exp_avg_scale;
      s.exp_avg_sq_scale = t.exp_avg_sq_scale;
    } else {
      s.max_exp_avg_sq = t.max_exp_avg_sq;
    }
    if (r.device_steps) {
      s.step = r.steps[k];
    } else {
      s.coeffs = t.coeffs;
    }
    if (pk.full()) pk.flush(launch);
  }
  pk.flush(launch);
  return pk.stats();
}

template <class Args, class Launcher>
LaunchStats run_sgd(const SGDRequest& r, Launcher& launcher) {
  constexpr int N = Args::kCapacity;
  constexpr bool kQ8 = IsQ8<Args>::value;
  const LaunchCommon& co = r.common;
  if (kQ8 && !q8_block_ok(r.hyper.q8_block)) {
    throw std::invalid_argument("sgd_step: 8-bit states need a valid block size");
  }
  void (*kernel)(FO_KARG(Args));
  if constexpr (kQ8) {
    kernel = pick_sgd_q8<N>(co, r.weight_decay, r.momentum_mode);
  } else {
    kernel = pick_sgd<N>(co, r.weight_decay, r.momentum_mode);
  }
  if (kernel == nullptr) throw std::invalid_argument("sgd_step: unsupported layout or momentum mode");
  const bool sr = co.store == kStoreStochastic;
  Packer<Args> pk(kQ8 ? r.hyper.q8_block : 0);
  Args& a = pk.args();
  a.h.hyper = r.hyper;
  a.h.u = uniform_of(co, r.maximize, false);
  auto launch = [&](int64_t blocks) {
    if constexpr (kQ8) {
      launcher.launch_cooperative(kernel, blocks, a);
    } else {
      launcher.launch(kernel, blocks, a);
    }
    std::fill(std::begin(a.first), std::end(a.first), 0u);
  };
  for (const SGDTensor& t : r.tensors) {
    if (t.numel == 0) continue;
    const int slot = pk.add(t.numel);
    auto& s = a.slot[slot];
    fill_slot(s, t, sr, t.sr_key);
    s.momentum_buffer = t.momentum_buffer;
    if constexpr (kQ8) s.momentum_scale = t.momentum_scale;
    if (t.first_step) a.first[slot >> 5] |= 1u << (slot & 31);
    if (pk.full()) pk.flush(launch);
  }
  pk.flush(launch);
  return pk.stats();
}

// The grad norm: per dtype (float32, bfloat16, float16, in this order), the
// tensors of that dtype in list order are packed into launches of stage 1,
// each writing its blocks' partials to the next free range of the scratch;
// then stage 2 reduces them all. The scratch offset a launch gets depends
// only on the sizes, so the order of every sum is fixed by the data.
// Returns the statistics; stats.blocks counts stage-1 blocks, i.e. the
// scratch entries used. With a NoLauncher nothing is launched (sizing).
struct NoLauncher {};

template <class Args, class Launcher>
LaunchStats run_norm(const NormRequest& r, Launcher& launcher) {
  constexpr bool launch = !std::is_same<Launcher, NoLauncher>::value;
  constexpr int N = Args::kCapacity;
  (void)N;  // used only when launching
  Packer<Args> pk;
  Args& a = pk.args();
  a.h.grad_scale = r.common.grad_scale;
  int64_t offset = 0;
  for (int32_t dtype : {kFloat32, kBFloat16, kFloat16}) {
    auto stage1 = [&](int64_t blocks) {
      a.h.partials = r.scratch + offset;
      if constexpr (launch) {
        if (offset + blocks > r.scratch_len) throw std::invalid_argument("grad_norm: scratch too small");
        if (dtype == kFloat32) launcher.launch_cooperative(&norm_partial_kernel<float, N>, blocks, a);
        if (dtype == kBFloat16) launcher.launch_cooperative(&norm_partial_kernel<bf16_t, N>, blocks, a);
        if (dtype == kFloat16) launcher.launch_cooperative(&norm_partial_kernel<f16_t, N>, blocks, a);
      }
      offset += blocks;
    };
    for (size_t k = 0; k < r.grads.size(); ++k) {
      if (r.dtypes[k] != dtype || r.numels[k] == 0) continue;
      NormSlot& s = a.slot[pk.add(r.numels[k])];
      s.grad = r.grads[k];
      s.numel = r.numels[k];
      if (pk.full()) pk.flush(stage1);
    }
    pk.flush(stage1);
  }
  if constexpr (launch) {
    NormFinalArgs f;
    f.partials = r.scratch;
    f.count = offset;
    f.out = r.out;
    f.max_norm = r.max_norm;
    launcher.launch_cooperative(&norm_final_kernel, 1, f);
  }
  return pk.stats();
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
template <>
struct BlocksOf<NormRequest> {
  using Large = NormArgsLarge;
  using Small = NormArgsSmall;
};

// The 8-bit parameter block beside each plain one.
template <class Args>
struct Q8Of;
template <>
struct Q8Of<AdamArgsLarge> { using type = AdamQ8ArgsLarge; };
template <>
struct Q8Of<AdamArgsSmall> { using type = AdamQ8ArgsSmall; };
template <>
struct Q8Of<SGDArgsLarge> { using type = SGDQ8ArgsLarge; };
template <>
struct Q8Of<SGDArgsSmall> { using type = SGDQ8ArgsSmall; };

template <class Args, class Launcher>
LaunchStats run(const AdamRequest& r, Launcher& launcher) {
  if (r.common.state_dtype == kQuant8) return run_adam<typename Q8Of<Args>::type>(r, launcher);
  return run_adam<Args>(r, launcher);
}
template <class Args, class Launcher>
LaunchStats run(const SGDRequest& r, Launcher& launcher) {
  if (r.common.state_dtype != kQuant8) return run_sgd<Args>(r, launcher);
  if (r.momentum_mode != kNoMomentum) return run_sgd<typename Q8Of<Args>::type>(r, launcher);
  // Without momentum there is no state: the plain kernel of the layout's
  // fp32-state twin (as the CPU kernels do).
  SGDRequest plain = r;
  plain.common.state_dtype = r.common.store == kStoreMaster ? kFloat32 : r.common.dtype;
  return run_sgd<Args>(plain, launcher);
}
template <class Args, class Launcher>
LaunchStats run(const NormRequest& r, Launcher& launcher) { return run_norm<Args>(r, launcher); }

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

// Scratch entries (float64) a grad-norm request needs with either parameter
// block: the larger of the two, so one size serves whichever runs.
inline int64_t norm_scratch_len(const NormRequest& r) {
  NoLauncher none;
  const int64_t large = run_norm<NormArgsLarge>(r, none).blocks;
  const int64_t small = run_norm<NormArgsSmall>(r, none).blocks;
  return std::max(large, small);
}

}  // namespace cuda
}  // namespace fusedoptim
