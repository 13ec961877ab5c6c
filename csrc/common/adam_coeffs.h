// The step-dependent scalars of Adam, shared by the host (CPU kernels, and
// CUDA launches whose step counters live on the host) and by CUDA kernels
// whose step counters live on the device (capturable / fused layout).
#pragma once

#include <cmath>
#include <cstdint>

#include "update_math.h"

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
#if defined(__CUDA_ARCH__)
  const double rs = 1.0 / ::sqrt(bc2);
#else
  const double rs = 1.0 / std::sqrt(bc2);
#endif
  AdamCoeffs c;
  c.neg_step_size = float(-(lr / bc1));
  c.inv_bc2_sqrt = float(rs);
  return c;
}

// The AdamW decay factor 1 - lr * weight_decay, in double, rounded to float.
FO_HD float adamw_decay(double lr, double weight_decay) { return float(1.0 - lr * weight_decay); }

}  // namespace fusedoptim
