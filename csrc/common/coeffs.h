// The host scalars of a step, written once: the step-independent ones of a
// call (AdamHyper, SGDHyper), the step-dependent ones of each tensor (bias
// corrections, stochastic-rounding keys), and the counting of host step
// counters that they derive from. adam_coeffs() and adamw_decay() also run
// in CUDA kernels whose step counters and lr live on the device (capturable).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "macros.h"
#include "params.h"
#include "precision.h"

namespace fusedoptim {

// beta^step in double. Step counts are whole numbers, so square-and-multiply
// gives the power with a few double roundings: after the coefficients are
// rounded to float they equal those from a correctly rounded pow() (checked
// for 11 betas and steps 1 to 200000: no difference). It needs no libm call,
// so GPU kernels that compute it keep everything in registers, and host and
// device use this same function.
FO_HD double pow_step(double beta, double step) {
  if (step >= 0.0 && step <= 2147483647.0 && double(int64_t(step)) == step) {
    int64_t n = int64_t(step);
    double r = 1.0, x = beta;
    while (n != 0) {
      if (n & 1) r *= x;
      x *= x;
      n >>= 1;
    }
    return r;
  }
#if defined(__CUDA_ARCH__)
  return ::exp2(step * ::log2(beta));
#else
  return std::exp2(step * std::log2(beta));
#endif
}

// In double, as torch computes them in Python, then rounded to float as
// torch's for-loop implementation does when it passes them to fp32 ops.
FO_HD AdamCoeffs adam_coeffs(double lr, double beta1, double beta2, double step) {
  const double bc1 = 1.0 - pow_step(beta1, step);
  const double bc2 = 1.0 - pow_step(beta2, step);
  AdamCoeffs c;
  c.neg_step_size = float(-(lr / bc1));
#if defined(__CUDA_ARCH__)
  c.bc2_sqrt = float(::sqrt(bc2));
#else
  c.bc2_sqrt = float(std::sqrt(bc2));
#endif
  return c;
}

// The AdamW decay factor 1 - lr * weight_decay, in double, rounded to float.
FO_HD float adamw_decay(double lr, double weight_decay) { return float(1.0 - lr * weight_decay); }

// The step-independent scalars of an Adam call (grad_mul left at 1).
inline AdamHyper adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
  AdamHyper h;
  const float w = float(1.0 - beta1);  // torch passes 1 - beta1 to lerp_ as a float
  h.lerp_from_grad = !(w < 0.5f);
  h.lerp_coeff = h.lerp_from_grad ? w - 1.0f : w;
  h.beta2 = float(beta2);
  h.one_minus_beta2 = float(1.0 - beta2);
  h.eps = float(eps);
  h.weight_decay = float(weight_decay);
  h.decay = decoupled ? adamw_decay(lr, weight_decay) : 1.0f;
  return h;
}

inline int adam_wd_mode(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? kNoDecay : (decoupled ? kDecoupled : kL2);
}

// The scalars of an SGD call (grad_mul left at 1).
inline SGDHyper sgd_hyper(double lr, double weight_decay, double momentum, double dampening) {
  SGDHyper h;
  h.neg_lr = float(-lr);
  h.weight_decay = float(weight_decay);
  h.momentum = float(momentum);
  h.one_minus_dampening = float(1.0 - dampening);
  return h;
}

inline int sgd_momentum_mode(double momentum, bool nesterov) {
  return momentum == 0.0 ? kNoMomentum : (nesterov ? kNesterov : kMomentum);
}

// adam_coeffs for a run of tensors that mostly share one step count: two
// pow() per tensor would cost more than the update of a small tensor.
class AdamCoeffCache {
 public:
  AdamCoeffCache(double lr, double beta1, double beta2) : lr_(lr), beta1_(beta1), beta2_(beta2) {}
  const AdamCoeffs& get(double step) {
    if (!valid_ || step != step_) {
      coeffs_ = adam_coeffs(lr_, beta1_, beta2_, step);
      step_ = step;
      valid_ = true;
    }
    return coeffs_;
  }

 private:
  double lr_, beta1_, beta2_;
  bool valid_ = false;
  double step_ = 0.0;
  AdamCoeffs coeffs_{};
};

// A host step counter: a float32 scalar, or a float64 one (torch's `step`
// when the default dtype is float64). bump() adds one in the counter's own
// dtype, as torch's `step_t += 1`, and returns the new count.
struct StepRef {
  void* p = nullptr;
  bool f64 = false;

  double bump() const {
    if (f64) return *static_cast<double*>(p) += 1.0;
    return double(*static_cast<float*>(p) += 1.0f);
  }
};

// Host step counters: the first write of a step. Each counter is
// incremented in its dtype, as torch does with `step_t += 1`, and the new count
// gives its tensor's bias corrections (Adam) and, with stochastic rounding,
// its random key sr_key(seed, step, tensor id). SGD keeps a counter only
// for the keys (torch's SGD has none).
class StepCounter {
 public:
  // Adam.
  StepCounter(double lr, double beta1, double beta2, int store, uint64_t seed)
      : coeffs_(lr, beta1, beta2), sr_(store == kStoreStochastic), seed_(seed) {}
  // SGD.
  StepCounter(int store, uint64_t seed) : coeffs_(0.0, 0.0, 0.0), sr_(store == kStoreStochastic), seed_(seed) {}

  void count(StepRef step, uint32_t tensor_id, AdamTensor& t) {
    const double s = step.bump();
    t.coeffs = coeffs_.get(s);
    if (sr_) t.sr_key = sr_key(seed_, uint32_t(s), tensor_id);
  }

  void count(StepRef step, uint32_t tensor_id, SGDTensor& t) {
    if (!sr_) return;
    t.sr_key = sr_key(seed_, uint32_t(step.bump()), tensor_id);
  }

  // Tensor k with counter steps[k] and id ids[k] (ids: empty without
  // stochastic rounding).
  template <class Tensor>
  void count_all(std::vector<Tensor>& tensors, const std::vector<StepRef>& steps, const std::vector<uint32_t>& ids) {
    if (steps.empty()) return;  // SGD without stochastic rounding keeps no counters
    for (size_t k = 0; k < tensors.size(); ++k) count(steps[k], ids.empty() ? 0u : ids[k], tensors[k]);
  }

 private:
  AdamCoeffCache coeffs_;
  bool sr_;
  uint64_t seed_;
};

}  // namespace fusedoptim
