// Plain-C parameter blocks shared by every backend.
//
// Nothing here knows about torch or pybind11: the binding layer turns Python
// values into these structs, and the kernels read only these structs.
#pragma once

#include <cstdint>

#include "macros.h"

namespace fusedoptim {

// Per-tensor scalars of an Adam step. They depend on the tensor's own step
// count (tensors of one group may be at different steps after
// add_param_group or a partial state_dict), so the host computes them in
// double, once per tensor and step, and rounds them to float as torch's
// for-loop implementation does when it passes Python floats to fp32 ops.
struct AdamCoeffs {
  float neg_step_size;     // -lr / (1 - beta1^t)
  float bc2_sqrt;          // sqrt(1 - beta2^t)
};

// Step-independent scalars of an Adam step, identical for all tensors.
struct AdamHyper {
  float lerp_coeff;        // w = 1 - beta1 if w < 0.5, else w - 1 (torch's lerp)
  bool lerp_from_grad;     // lerp base: exp_avg if w < 0.5, else the grad
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;      // L2 coefficient (Adam); unused by AdamW
  float decay;             // AdamW: 1 - lr * weight_decay; 1 otherwise
  float grad_mul = 1.0f;   // grads are multiplied by it first: the clip coefficient, else 1
  int32_t q8_block = 0;    // 8-bit states: elements per block (Note [8-bit states])
  bool q8_overlap = false; // 8-bit states on the CPU: Note [8-bit passes] (cpu/kernels.cpp)
};

struct SGDHyper {
  float neg_lr;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  float grad_mul = 1.0f;   // as AdamHyper::grad_mul
  int32_t q8_block = 0;    // as AdamHyper::q8_block
};

// One tensor of a fused call: the streams it owns plus its element count.
// Unused streams are null (e.g. max_exp_avg_sq without amsgrad).
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  // The store's extra stream (Note [precision options] in precision.h):
  // the fp32 master copy (kStoreMaster), the compensation (kStoreKahan).
  void* extra = nullptr;
  // 8-bit states: the fp32 scales of exp_avg and exp_avg_sq, one per block
  // (exp_avg and exp_avg_sq then point at uint8 codes).
  float* exp_avg_scale = nullptr;
  float* exp_avg_sq_scale = nullptr;
  int64_t numel;
  AdamCoeffs coeffs;
  uint32_t sr_key = 0;     // kStoreStochastic: sr_key(seed, step, tensor id)
};

struct SGDTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;   // null when momentum == 0
  void* extra = nullptr;   // as AdamTensor::extra
  float* momentum_scale = nullptr;  // 8-bit states: the buffer's scales, as AdamTensor's
  int64_t numel;
  bool first_step;         // buffer not yet initialised: buf = grad
  uint32_t sr_key = 0;     // as AdamTensor::sr_key
};

}  // namespace fusedoptim
