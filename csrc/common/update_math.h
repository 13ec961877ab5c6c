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
// The formulas are torch.optim's for-loop implementations, rounded as
// torch rounds them: see Note [torch's rounding order].
//
// Note [torch's rounding order]
// torch's for-loop step is a sequence of vectorised ATen kernels, each of
// which rounds its result to fp32. The updates below perform the same
// operations in the same order, with an fma exactly where the AVX2/AVX-512
// body of the ATen kernel uses vec::fmadd (add/sub with alpha, lerp,
// addcmul), so that an fp32 step gives torch's bits:
//   Adam   g = maximize ? -grad : grad
//          g = fma(p, wd, g)                       grad.add(param, alpha=wd)   (L2)
//          p = p * (1 - lr * wd)                   param.mul_(...)             (AdamW)
//          m = fma(w', g - m, m or g)              exp_avg.lerp_(grad, w)      (w' = w or w - 1)
//          v = fma((1 - beta2) * g, g, v * beta2)  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//          vmax = max(vmax, v)                     torch.maximum                (amsgrad)
//          d = sqrt(v) / sqrt(bc2) + eps           (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
//          p = p + (-step_size * m) / d            param.addcdiv_(exp_avg, denom, value=-step_size)
//   SGD    g = maximize ? -grad : grad
//          g = fma(p, wd, g)                       grad.add(param, alpha=wd)
//          buf = first ? g : fma(g, 1 - dampening, buf * momentum)
//                                                  buf.mul_(momentum).add_(grad, alpha=1 - dampening)
//          g = nesterov ? fma(buf, momentum, g) : buf
//          p = fma(g, -lr, p)                      param.add_(grad, alpha=-lr)
// The scalars are torch's: Python doubles rounded to fp32 where a kernel
// takes them (common/coeffs.h). torch's scalar tail and its DEFAULT (non-
// AVX2) build may contract differently; the order here is the vector body's.
// Where torch itself is not correctly rounded fusedoptim cannot follow it:
// its CPU sqrt (a vector math library's) is off by one ulp on some inputs,
// so Adam differs from the for-loop on the few elements where that moves
// the param, exactly as torch's own fused=True step does (whose bits these
// are). g starts as grad * grad_mul, the clip coefficient of max_grad_norm
// (a factor of exactly 1 is skipped on the host: the bits are the same).
#pragma once

#include "macros.h"
#include "params.h"

namespace fusedoptim {

// Scalars of one Adam tensor, broadcast to the lanes of V.
template <class V>
struct AdamConsts {
  V lerp_coeff, beta2, one_minus_beta2, eps, weight_decay, decay;
  V neg_step_size, bc2_sqrt, grad_mul;
  bool lerp_from_grad, scale_grad;

  FO_HD AdamConsts(const AdamHyper& h, const AdamCoeffs& c)
      : lerp_coeff(V(h.lerp_coeff)), beta2(V(h.beta2)),
        one_minus_beta2(V(h.one_minus_beta2)), eps(V(h.eps)),
        weight_decay(V(h.weight_decay)), decay(V(h.decay)),
        neg_step_size(V(c.neg_step_size)), bc2_sqrt(V(c.bc2_sqrt)), grad_mul(V(h.grad_mul)),
        lerp_from_grad(h.lerp_from_grad), scale_grad(!(h.grad_mul == 1.0f)) {}
};

// Note [folded bias correction]
// With 8-bit states (Note [8-bit states] in quant8.h) the step divides once:
//          p = p + (-step_size * sqrt(bc2)) * m / (sqrt(v) + eps * sqrt(bc2))
// the same value as torch's d = sqrt(v) / sqrt(bc2) + eps, times sqrt(bc2)
// above and below, with a few roundings placed differently (a few ulps of
// the update, far below what 8-bit moments carry; torch's bits are the goal
// of fp32 states only). The two scalar products do not depend on the
// element and are computed once per loop. Why: that step is bound by
// instructions, and the square root and two divisions of every vector are
// its longest share; one division fewer made the 8-bit AdamW step 10-15%
// faster on one Zen 3 core (AVX2, a block loop in L2).
template <int kWD, bool kAmsgrad, bool kMaximize, bool kFoldBC2 = false, class V>
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
  // addcmul: ((1 - beta2) * g) * g, then added to v * beta2 in one fma (g * g
  // alone would overflow for |g| > 1.8e19 where the scaled product does not).
  v = fma(mul(c.one_minus_beta2, g), g, mul(v, c.beta2));
  V second = v;
  if (kAmsgrad) {
    vmax = max_nan(vmax, v);
    second = vmax;
  }
  if constexpr (kFoldBC2) {  // Note [folded bias correction]
    const V denom = add(sqrt(second), mul(c.eps, c.bc2_sqrt));
    p = add(p, div(mul(mul(c.neg_step_size, c.bc2_sqrt), m), denom));
  } else {
    const V denom = add(div(sqrt(second), c.bc2_sqrt), c.eps);
    p = add(p, div(mul(c.neg_step_size, m), denom));
  }
}

// Scalars of one SGD call, broadcast to the lanes of V.
template <class V>
struct SGDConsts {
  V neg_lr, weight_decay, momentum, one_minus_dampening, grad_mul;
  bool scale_grad;

  FO_HD explicit SGDConsts(const SGDHyper& h)
      : neg_lr(V(h.neg_lr)), weight_decay(V(h.weight_decay)),
        momentum(V(h.momentum)), one_minus_dampening(V(h.one_minus_dampening)), grad_mul(V(h.grad_mul)),
        scale_grad(!(h.grad_mul == 1.0f)) {}
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
    // first step (no dampening), then buf.mul_(momentum).add_(g, alpha=1 - d):
    // the product rounded, then one fma (exactly buf * momentum + g when d = 0).
    buf = kFirst ? g : fma(g, c.one_minus_dampening, mul(buf, c.momentum));
    g = (kMom == kNesterov) ? fma(buf, c.momentum, g) : buf;
  }
  p = fma(g, c.neg_lr, p);
}

}  // namespace fusedoptim
