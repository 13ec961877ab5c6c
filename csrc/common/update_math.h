// The per-element update rules of Adam, AdamW and SGD, written once.
//
// Note [one source of math]
// Every backend (scalar, AVX2, AVX-512 and the CUDA kernels) instantiates
// these templates with its own vector type V. V is a value type holding one
// or more fp32 lanes and must provide, as free functions found by ADL:
//   add(a, b)  sub(a, b)  mul(a, b)  div(a, b)  sqrt(a)
//   fma(a, b, c) = a * b + c with a single rounding
//   max_nan(a, b) = isnan(a) ? a : (a > b ? a : b)   (NaN propagates)
//   neg(a)        = a with its sign bit flipped
// Each is correctly rounded IEEE-754 binary32 in every variant, the order of
// operations below is fixed, and the code is built with -ffp-contract=off,
// so no compiler may fuse or reorder anything: all variants produce the same
// bits for the same inputs. Any change here changes every backend at once.
//
// The formulas follow torch.optim's for-loop implementations:
// g starts as grad * grad_mul (the clip coefficient of max_grad_norm). A
// factor of exactly 1 (no clipping; SGD's 1 - dampening with no dampening)
// is skipped: multiplying by 1 changes no value, and the operations after it
// quiet a NaN either way, so the bits are the same, one multiply cheaper.
//   Adam   g = maximize ? -grad : grad;  g += wd * p           (L2)
//          p *= 1 - lr * wd                                    (AdamW)
//          m = lerp(m, g, 1 - beta1)      (torch's two-sided lerp, see below)
//          v = beta2 * v + ((1 - beta2) * g) * g
//          vmax = max(vmax, v)                                 (amsgrad)
//          p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps)
//   SGD    g = maximize ? -grad : grad;  g += wd * p
//          buf = first ? g : momentum * buf + (1 - dampening) * g
//          g = nesterov ? g + momentum * buf : buf
//          p -= lr * g
#pragma once

#include "macros.h"
#include "params.h"

namespace fusedoptim {

// Scalars of one Adam tensor, broadcast to the lanes of V.
template <class V>
struct AdamConsts {
  V lerp_coeff, beta2, one_minus_beta2, eps, weight_decay, decay;
  V neg_step_size, inv_bc2_sqrt, grad_mul;
  bool lerp_from_grad, scale_grad;

  FO_HD AdamConsts(const AdamHyper& h, const AdamCoeffs& c)
      : lerp_coeff(V(h.lerp_coeff)), beta2(V(h.beta2)),
        one_minus_beta2(V(h.one_minus_beta2)), eps(V(h.eps)),
        weight_decay(V(h.weight_decay)), decay(V(h.decay)),
        neg_step_size(V(c.neg_step_size)), inv_bc2_sqrt(V(c.inv_bc2_sqrt)), grad_mul(V(h.grad_mul)),
        lerp_from_grad(h.lerp_from_grad), scale_grad(!(h.grad_mul == 1.0f)) {}
};

template <int kWD, bool kAmsgrad, bool kMaximize, class V>
FO_HD void adam_update(V& p, V g, V& m, V& v, V& vmax, const AdamConsts<V>& c) {
#if defined(__CUDA_ARCH__)
  g = mul(g, c.grad_mul);  // (a branch here costs GPU registers; the bits are the same)
#else
  if (c.scale_grad) g = mul(g, c.grad_mul);
#endif
  if (kMaximize) g = neg(g);
  if (kWD == kL2) g = fma(p, c.weight_decay, g);
  if (kWD == kDecoupled) p = mul(p, c.decay);
  // torch's lerp(m, g, w): m + w * (g - m) for w < 0.5, else
  // g + (w - 1) * (g - m), so that beta1 = 0 gives m = g exactly.
  m = fma(c.lerp_coeff, sub(g, m), c.lerp_from_grad ? g : m);
  // ((1 - beta2) * g) * g, in torch's addcmul order: g * g alone overflows
  // for |g| > 1.8e19 where the scaled product does not.
  v = fma(v, c.beta2, mul(mul(c.one_minus_beta2, g), g));
  V second = v;
  if (kAmsgrad) {
    vmax = max_nan(vmax, v);
    second = vmax;
  }
  const V denom = fma(sqrt(second), c.inv_bc2_sqrt, c.eps);
  p = fma(div(m, denom), c.neg_step_size, p);
}

// Scalars of one SGD call, broadcast to the lanes of V.
template <class V>
struct SGDConsts {
  V neg_lr, weight_decay, momentum, one_minus_dampening, grad_mul;
  bool scale_grad, dampen;

  FO_HD explicit SGDConsts(const SGDHyper& h)
      : neg_lr(V(h.neg_lr)), weight_decay(V(h.weight_decay)),
        momentum(V(h.momentum)), one_minus_dampening(V(h.one_minus_dampening)), grad_mul(V(h.grad_mul)),
        scale_grad(!(h.grad_mul == 1.0f)), dampen(!(h.one_minus_dampening == 1.0f)) {}
};

template <bool kWeightDecay, int kMom, bool kMaximize, bool kFirst, class V>
FO_HD void sgd_update(V& p, V g, V& buf, const SGDConsts<V>& c) {
#if defined(__CUDA_ARCH__)
  g = mul(g, c.grad_mul);
#else
  if (c.scale_grad) g = mul(g, c.grad_mul);
#endif
  if (kMaximize) g = neg(g);
  if (kWeightDecay) g = fma(p, c.weight_decay, g);
  if (kMom != kNoMomentum) {
    // torch.optim.SGD initialises the buffer with the gradient itself on the
    // first step (no dampening), then buf = momentum * buf + (1 - d) * g.
#if defined(__CUDA_ARCH__)
    buf = kFirst ? g : fma(buf, c.momentum, mul(g, c.one_minus_dampening));
#else
    buf = kFirst ? g : fma(buf, c.momentum, c.dampen ? mul(g, c.one_minus_dampening) : g);
#endif
    g = (kMom == kNesterov) ? fma(buf, c.momentum, g) : buf;
  }
  p = fma(g, c.neg_lr, p);
}

}  // namespace fusedoptim
