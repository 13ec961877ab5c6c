// Precision options beyond torch.optim: how a step's fp32 result is stored,
// the counter-based random bits of stochastic rounding, and the gradient
// clipping coefficient. Host and device code, like update_math.h.
//
// Note [precision options]
// The update itself (adam_update / sgd_update) never changes: an option
// only decides where the fp32 param the update starts from comes from and
// how its fp32 result is stored (StoreMode), which storage type holds the
// optimizer states, and what factor the grad is multiplied by first.
//
// The store modes (StoreMode, macros.h), written once in store.h:
//
//   kStorePlain       p = load(param);  param = rne(p')                 (torch)
//   kStoreMaster      p = master (fp32); master = p';  param = rne(p')
//   kStoreStochastic  p = load(param);  param = sr(p', bits(key, i))    (bf16)
//   kStoreKahan       p = load(param);  c = load(comp)
//                     y = (p' - p) + c;  s = p + y;  param = rne(s)
//                     comp = rne(y - (float(param) - p))
//
// The (param, state, store) combinations compiled are listed in layouts.h.
// rne is round to nearest even. sr adds 16 random bits to the 16 bits that
// bf16 drops and truncates, so it rounds up with probability equal to the
// distance to the lower neighbour: unbiased. The bits of element i of a
// tensor are a hash of (seed, step, tensor id, i): the same for any thread
// split, ISA variant or device, and reproducible from a state_dict.
//
// Gradient clipping: the grads' global L2 norm is reduced in double (squares
// of fp32 values are exact in double, so only the order of the sums matters
// and it is fixed by the data, never by the thread count); the update then
// multiplies each grad by clip_coef(), torch.nn.utils.clip_grad_norm_'s
// min(1, max_norm / (norm + 1e-6)) in the same fp32 operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "convert.h"
#include "macros.h"

namespace fusedoptim {

// A 32-bit integer hash with full avalanche (a bijection; mix32(0) == 0).
FO_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The key of one tensor at one step: every element's bits derive from it.
FO_HD uint32_t sr_key(uint64_t seed, uint32_t step, uint32_t tensor_id) {
  uint32_t k = mix32(uint32_t(seed) ^ 0x9e3779b9u);
  k = mix32(k ^ uint32_t(seed >> 32));
  k = mix32(k ^ step);
  return mix32(k + tensor_id * 0x85ebca6bu);
}

// The key for elements whose index has high word `hi` (i >> 32): vector
// loops compute it once per vector, which never straddles a multiple of
// 2^32 (vectors start at multiples of their width).
FO_HD uint32_t sr_key_hi(uint32_t key, uint32_t hi) { return key ^ mix32(hi); }

// The 32 random bits of element i (low word lo) under sr_key_hi(key, hi).
FO_HD uint32_t sr_bits(uint32_t key_hi, uint32_t lo) { return mix32(key_hi ^ (lo * 0x9e3779b9u)); }

// fp32 -> bf16, rounded up or down at random: the top 16 of the 32 random
// bits are added below the kept bits, then the low half is dropped. Carries
// run into the exponent as they should (the largest finite values may round
// up to inf); inf stays inf (its low half is zero); NaN becomes 0x7FC0 as in
// float_to_bf16.
FO_HD uint16_t float_to_bf16_sr(float f, uint32_t bits) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + (bits >> 16)) >> 16);
}

// torch.nn.utils.clip_grad_norm_'s coefficient from the sum of squares:
// total_norm = float(sqrt(sumsq)); coef = reciprocal(total_norm + 1e-6) *
// max_norm (torch's `max_norm / tensor` is reciprocal-then-multiply), then
// clamp(max=1). NaN stays NaN and an infinite norm gives 0, as in torch
// with error_if_nonfinite=False.
FO_HD float clip_coef(double sumsq, float max_norm, float* total_norm) {
  const float norm = float(sqrt(sumsq));
  if (total_norm != nullptr) *total_norm = norm;
  const float c = (1.0f / (norm + 1e-6f)) * max_norm;
  return c > 1.0f ? 1.0f : c;
}

// Chunks of the deterministic grad-norm reduction: each tensor is cut into
// chunks of kNormChunk elements (from its start); a chunk's squares go to
// kNormLanes double accumulators by element index (lane = i % kNormLanes,
// in index order: 16 lanes are 4 independent AVX2 additions in flight),
// then the lanes are summed pairwise (norm_lanes_sum). Chunk sums add up in
// chunk order, tensor sums in tensor order. The CPU variants all follow
// this exactly; the CUDA reduction is deterministic in its own order.
constexpr int64_t kNormChunk = 4096;
constexpr int kNormLanes = 16;

// x rounded to storage type S and back (exact: the vector types' load and
// store are the reference conversions). The CUDA lane type overloads it.
template <class S, class V>
FO_HD V round_as(V x) {
  S tmp[V::kWidth];
  x.store(tmp);
  return V::load(tmp);
}

// Kahan-compensated store of an updated param (see the table above): p_old
// is the stored param, p_new the update's fp32 result, comp the carried
// error (updated in place). Returns the new param, exactly representable in S.
template <class S, class V>
FO_HD V kahan_store(V p_old, V p_new, V& comp) {
  const V y = add(sub(p_new, p_old), comp);
  const V stored = round_as<S>(add(p_old, y));
  comp = sub(y, sub(stored, p_old));
  return stored;
}

FO_HD double norm_lanes_sum(const double* l) {
  const double a = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  const double b = ((l[8] + l[9]) + (l[10] + l[11])) + ((l[12] + l[13]) + (l[14] + l[15]));
  return a + b;
}

}  // namespace fusedoptim
