// The table of CPU kernels that each ISA variant fills in.
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace fusedoptim {
namespace cpu {

// Which storage a call uses: params/grads, states, and the store mode
// (Note [precision options] in common/precision.h).
struct Layout {
  int32_t dtype;
  int32_t state_dtype;
  int store;
};

// Update elements [begin, end) of one tensor. All flags are resolved to a
// template instantiation once per call, so the loop has no branches.
using AdamSegmentFn = void (*)(const AdamTensor&, int64_t begin, int64_t end, const AdamHyper&);
using SGDSegmentFn = void (*)(const SGDTensor&, int64_t begin, int64_t end, const SGDHyper&);

// Bandwidth probe: for every element, x += r for each of the `nrw`
// read-write streams x, which touches exactly the bytes of an optimizer
// step with the same number of streams (Adam: 3 read-write + the grad).
// The non-temporal probe writes the read-write streams with streaming
// stores, which skip the cache's write-back of each line (the faster of the
// two is the limit; the scalar variant has only the plain one).
using ProbeSegmentFn = void (*)(void* const* rw, const void* r, int64_t begin, int64_t end);
// One chunk of the grad-norm reduction: the sum of squares of elements
// [begin, end) of a grad, in double, in the fixed order of precision.h.
using NormChunkFn = double (*)(const void* grad, int64_t begin, int64_t end);
// STREAM triad a = b + s * c in fp32, for reference.
using TriadSegmentFn = void (*)(float* a, const float* b, const float* c, float s, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;  // "scalar", "avx2", "avx512", "avx512bf16"
  int vector_width; // fp32 lanes
  AdamSegmentFn (*adam)(const Layout& layout, int wd_mode, bool amsgrad, bool maximize);
  SGDSegmentFn (*sgd)(const Layout& layout, bool weight_decay, int momentum_mode, bool maximize, bool first_step);
  ProbeSegmentFn (*probe)(int32_t dtype, int nrw, bool nontemporal);
  TriadSegmentFn triad;
  NormChunkFn (*norm)(int32_t dtype);
};

// Defined once per variant in kernels.cpp; variants not built for this
// target return nullptr.
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512bf16();

}  // namespace cpu
}  // namespace fusedoptim
