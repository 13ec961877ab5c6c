// The store modes of Note [precision options] (precision.h), written once
// for every backend: where the fp32 param an update starts from comes from,
// and how the update's fp32 result is stored.
//
// Both functions are templates over the vector type V and an accessor `io`
// for one element (CUDA: fp32 values in registers) or one vector (CPU:
// memory) of a tensor, which provides:
//   load_param()  load_extra()    the stored param; the extra stream (fp32
//                                 master or Kahan compensation)
//   param(v)      extra(v)        store v, rounded to nearest even
//   param_sr(v)                   store v with stochastic rounding (bf16)
// The accessors do only memory and conversions; every arithmetic operation
// of a store is here, in this order, for all backends.
#pragma once

#include "macros.h"
#include "precision.h"

namespace fusedoptim {

template <int kStore, class V, class IO>
FO_HD_ALWAYS V start_param(const IO& io) {
  if constexpr (kStore == kStoreMaster) {
    return io.load_extra();
  } else {
    return io.load_param();
  }
}

// Stores the update's result pv; p0 is the value it started from.
template <class S, int kStore, class V, class IO>
FO_HD_ALWAYS void store_param(const IO& io, V p0, V pv) {
  if constexpr (kStore == kStorePlain) {
    io.param(pv);
  } else if constexpr (kStore == kStoreMaster) {
    io.extra(pv);
    io.param(pv);
  } else if constexpr (kStore == kStoreStochastic) {
    io.param_sr(pv);
  } else {
    V comp = io.load_extra();
    const V stored = kahan_store<S>(p0, pv, comp);
    io.param(stored);
    io.extra(comp);
  }
}

}  // namespace fusedoptim
