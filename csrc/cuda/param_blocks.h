// The parameter blocks of the multi-tensor kernels: plain structs of
// pointers, sizes and scalars that a launch passes by value, and the sizes
// that decide how many tensors one launch carries.
//
// Note [kernel parameter space]
// Tensor addresses travel in the kernel's parameter block. CUDA 12.1 and
// newer toolkits, on drivers of 12.1 and newer and GPUs of compute
// capability 7.0 and up, accept 32764 bytes of kernel parameters instead of
// 4096. The large block carries ~9x more tensors per launch; the small one
// is the fallback for older drivers.
#pragma once

#include <cstdint>

#include "../common/params.h"

#if defined(__CUDACC__)
// Kernels take their parameter block by value; emulated ones by reference,
// which avoids a 32 KB copy per emulated thread.
#define FO_KARG(T) const T
#else
#define FO_KARG(T) const T&
#endif

namespace fusedoptim {
namespace cuda {

constexpr int kBlockThreads = 256;
constexpr int64_t kChunk = 8192;       // elements of the flat list per block
constexpr int64_t kPad = 8;            // tensors start at multiples of 8 elements (16 or 32 bytes)
constexpr int kLargeParamBytes = 32764;
constexpr int kSmallParamBytes = 4096;

// A tensor of an Adam launch. Two pairs of fields share storage, one of each
// pair used by a given launch: the extra stream of kStoreMaster/kStoreKahan
// or the stochastic-rounding word (kStoreStochastic: the key with host
// steps, the tensor id with device steps), and the device step counter or
// the host-computed coefficients. This keeps a slot at 64 bytes, so the
// capacities stay those of the plain layouts.
struct AdamSlot {
  void* param;
  void* grad;  // written only to store AMP-unscaled grads
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  union {
    void* extra;
    uint32_t sr;
  };
  union {
    float* step;        // device_steps only
    AdamCoeffs coeffs;  // host steps only
  };
  int64_t numel;
};

// Launch-wide values of the update kernels, read once per block.
struct Uniform {
  const float* grad_scale;  // AMP: grads are divided by it (and written back)
  const float* found_inf;   // AMP: non-zero means this launch changes nothing
  const float* clip_coef;   // the grad multiplier (max_grad_norm), null = 1
  int32_t maximize;
  int32_t device_steps;     // Adam only
};

struct AdamHeader {
  AdamHyper hyper;
  Uniform u;
  double lr, beta1, beta2, weight_decay;
  const float* lr_ptr;
  uint64_t seed;  // stochastic rounding with device steps
  int32_t count;
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
  union {
    void* extra;  // as AdamSlot
    uint32_t sr;  // stochastic rounding: the key
  };
  int64_t numel;
};

struct SGDHeader {
  SGDHyper hyper;
  Uniform u;
  int32_t count;
};

template <int N>
struct SGDArgs {
  static constexpr int kCapacity = N;
  SGDHeader h;
  int64_t start[N];
  SGDSlot slot[N];
  uint32_t first[(N + 31) / 32];  // bit t: tensor t's buffer is not initialised yet (buf = grad)
};

// 8-bit states (Note [8-bit states] in common/quant8.h): a block of the
// update kernel owns one quantization block of one tensor, so start[t]
// counts quantization blocks, not elements (Note [8-bit states on CUDA] in
// mta_kernels.h). The slots add the scales to the plain layouts' fields.
struct AdamQ8Slot {
  void* param;
  void* grad;
  void* exp_avg;     // uint8 codes
  void* exp_avg_sq;  // uint8 codes of sqrt(exp_avg_sq)
  float* exp_avg_scale;
  float* exp_avg_sq_scale;
  union {
    void* extra;
    uint32_t sr;
  };
  union {
    float* step;
    AdamCoeffs coeffs;
  };
  int64_t numel;
};

template <int N>
struct AdamQ8Args {
  static constexpr int kCapacity = N;
  AdamHeader h;
  int64_t start[N];  // the first block of each tensor
  AdamQ8Slot slot[N];
};

struct SGDQ8Slot {
  void* param;
  void* grad;
  void* momentum_buffer;  // uint8 codes
  float* momentum_scale;
  union {
    void* extra;
    uint32_t sr;
  };
  int64_t numel;
};

template <int N>
struct SGDQ8Args {
  static constexpr int kCapacity = N;
  SGDHeader h;
  int64_t start[N];
  SGDQ8Slot slot[N];
  uint32_t first[(N + 31) / 32];
};

// The grad-norm reduction: one launch per dtype and up to N tensors.
struct NormSlot {
  const void* grad;
  int64_t numel;
};

struct NormHeader {
  const float* grad_scale;  // AMP: grads are unscaled (as the update reads them) before squaring
  double* partials;         // one per block of this launch
  int32_t count;
};

template <int N>
struct NormArgs {
  static constexpr int kCapacity = N;
  NormHeader h;
  int64_t start[N];
  NormSlot slot[N];
};

struct NormFinalArgs {
  const double* partials;
  int64_t count;
  float* out;  // out[0] = total norm, out[1] = clip coefficient
  float max_norm;
};

using AdamArgsLarge = AdamArgs<448>;
using AdamArgsSmall = AdamArgs<48>;
using SGDArgsLarge = SGDArgs<672>;
using SGDArgsSmall = SGDArgs<80>;
using NormArgsLarge = NormArgs<1360>;
using NormArgsSmall = NormArgs<168>;
using AdamQ8ArgsLarge = AdamQ8Args<360>;
using AdamQ8ArgsSmall = AdamQ8Args<40>;
using SGDQ8ArgsLarge = SGDQ8Args<560>;
using SGDQ8ArgsSmall = SGDQ8Args<64>;
static_assert(sizeof(AdamSlot) == 64, "AdamSlot layout");
static_assert(sizeof(AdamQ8ArgsLarge) <= kLargeParamBytes, "Adam 8-bit large parameter block");
static_assert(sizeof(AdamQ8ArgsSmall) <= kSmallParamBytes, "Adam 8-bit small parameter block");
static_assert(sizeof(SGDQ8ArgsLarge) <= kLargeParamBytes, "SGD 8-bit large parameter block");
static_assert(sizeof(SGDQ8ArgsSmall) <= kSmallParamBytes, "SGD 8-bit small parameter block");
static_assert(sizeof(SGDSlot) == 40, "SGDSlot layout");
static_assert(sizeof(AdamArgsLarge) <= kLargeParamBytes, "Adam large parameter block");
static_assert(sizeof(AdamArgsSmall) <= kSmallParamBytes, "Adam small parameter block");
static_assert(sizeof(SGDArgsLarge) <= kLargeParamBytes, "SGD large parameter block");
static_assert(sizeof(SGDArgsSmall) <= kSmallParamBytes, "SGD small parameter block");
static_assert(sizeof(NormArgsLarge) <= kLargeParamBytes, "norm large parameter block");
static_assert(sizeof(NormArgsSmall) <= kSmallParamBytes, "norm small parameter block");

}  // namespace cuda
}  // namespace fusedoptim
