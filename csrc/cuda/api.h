// The CUDA backend as the binding layer sees it: plain structs in, nothing
// torch, nothing CUDA. Two implementations exist:
//   cuda::real  (kernels.cu, built by nvcc)   runs the kernels on a GPU
//   cuda::emu   (emulated.cpp, built by g++)  runs the same kernel source on
//               the CPU through emulation.h, for tests on machines without a GPU
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../common/macros.h"
#include "../common/params.h"

namespace fusedoptim {
namespace cuda {

// Which kernel parameter block a launch uses (see Note [kernel parameter space]).
enum class ParamSpace : int { kAuto = 0, kLarge = 1, kSmall = 2 };

// Scalars of a launch that are not per tensor. Device pointers may be null.
struct LaunchCommon {
  int32_t dtype = kFloat32;          // params and grads
  int32_t state_dtype = kFloat32;    // optimizer states
  int store = 0;                     // StoreMode of common/macros.h
  int device = 0;
  uintptr_t stream = 0;              // cudaStream_t of the params' device
  ParamSpace space = ParamSpace::kAuto;
  const float* grad_scale = nullptr; // AMP: grads are divided by it in the kernel, and written back
  const float* found_inf = nullptr;  // AMP: non-zero means this step changes nothing
  const float* clip_coef = nullptr;  // grads are multiplied by it (max_grad_norm); null = 1
};

struct AdamRequest {
  LaunchCommon common;
  AdamHyper hyper;                   // from the host lr; see lr_ptr
  int wd_mode = kNoDecay;
  bool amsgrad = false, maximize = false;
  // Step counters on the device (torch's layout with capturable=True or
  // fused=True): a kernel increments them (unless found_inf) and the main
  // kernel computes the bias corrections from them. Otherwise the host has
  // incremented them and filled AdamTensor::coeffs.
  bool device_steps = false;
  std::vector<float*> steps;         // device_steps only, one per tensor
  double lr = 0, beta1 = 0, beta2 = 0, weight_decay = 0;
  const float* lr_ptr = nullptr;     // device_steps only: lr read on the device
  // Stochastic rounding: with host steps each AdamTensor::sr_key is set;
  // with device steps the kernel computes sr_key(seed, step, tensor id).
  uint64_t seed = 0;
  std::vector<uint32_t> tensor_ids;  // device_steps with stochastic rounding, one per tensor
  std::vector<AdamTensor> tensors;
};

struct SGDRequest {
  LaunchCommon common;
  SGDHyper hyper;
  bool weight_decay = false;
  int momentum_mode = kNoMomentum;
  bool maximize = false;
  std::vector<SGDTensor> tensors;
};

// The global L2 norm of a list of grads (mixed dtypes), deterministic:
// out[0] = the norm, out[1] = clip_grad_norm_'s coefficient for max_norm.
// scratch holds at least norm_scratch_len() doubles (device memory).
struct NormRequest {
  LaunchCommon common;               // device, stream, space, grad_scale (dtype and found_inf unused)
  std::vector<const void*> grads;
  std::vector<int64_t> numels;
  std::vector<int32_t> dtypes;
  double* scratch = nullptr;
  int64_t scratch_len = 0;
  float* out = nullptr;
  float max_norm = 1.0f;
};

// What one call launched, for tests and for the notes of a benchmark.
struct LaunchStats {
  int launches = 0;                  // update kernels (step-increment kernels not counted)
  int64_t blocks = 0;
  int max_tensors_per_launch = 0;
  int capacity = 0;                  // tensors one launch can carry
  int param_bytes = 0;               // size of the kernel parameter block
};

namespace real {
// CUDA errors are thrown as std::runtime_error with the CUDA error text.
LaunchStats adam_step(const AdamRequest& r);
LaunchStats sgd_step(const SGDRequest& r);
LaunchStats grad_norm(const NormRequest& r);
// Whether kernels can run here, and why not ("" when they can).
bool available(std::string* reason);
int device_count();
int driver_version();   // 0 without a driver
int runtime_version();
std::vector<int> compiled_archs();
bool large_param_space(); // the driver accepts the large parameter block
}  // namespace real

namespace emu {
LaunchStats adam_step(const AdamRequest& r);
LaunchStats sgd_step(const SGDRequest& r);
LaunchStats grad_norm(const NormRequest& r);
// Scratch doubles a NormRequest needs (pointers unused); the same for both backends.
int64_t norm_scratch_len(const NormRequest& r);
}  // namespace emu

}  // namespace cuda
}  // namespace fusedoptim
