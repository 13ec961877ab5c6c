// Choosing a CPU variant, and the fused multi-tensor drivers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../common/params.h"
#include "kernels.h"

namespace fusedoptim {
namespace cpu {

// Variants compiled into this build, in order of preference.
std::vector<std::string> compiled_isas();
// Compiled variants this CPU and OS can run.
std::vector<std::string> supported_isas();
// The variant in use: FUSEDOPTIM_CPU_ISA if set (read at import), else the
// best supported one.
const KernelTable& active_kernels();
// Forces a variant; throws std::invalid_argument for an unknown name and
// std::runtime_error for one this machine cannot run.
void set_isa(const std::string& name);

// How the CPU kernels arrange the passes over a block of 8-bit Adam states
// (Note [8-bit passes] in kernels.cpp): "overlap" or "separate" forces one
// (the scalar variant always runs "separate"), "auto" (the default, and
// FUSEDOPTIM_Q8_PASSES when set at import) picks by variant and CPU. The
// bits are the same either way. Throws std::invalid_argument for another name.
void set_q8_passes(const std::string& name);
// The arrangement the active variant runs now: "overlap" or "separate",
// with " (auto)" when it was not forced.
std::string q8_passes();

// One fused call over every tensor of a group: a single parallel region over
// the flattened list, cut into chunks aligned to 64 elements of each tensor.
void adam_step(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper, const Layout& layout,
               int wd_mode, bool amsgrad, bool maximize, int num_threads);
void sgd_step(const std::vector<SGDTensor>& tensors, const SGDHyper& hyper, const Layout& layout,
              bool weight_decay, int momentum_mode, bool maximize, int num_threads);

// One grad of a norm reduction.
struct NormTensor {
  const void* grad;
  int64_t numel;
  int32_t dtype;
};
// Sum of squares of every element, in the fixed order of Note [precision
// options]: chunks of kNormChunk elements of each tensor, in parallel; the
// chunk sums then add up in order, so any thread count gives the same bits.
double grad_norm_sq(const std::vector<NormTensor>& grads, int num_threads);

// Bandwidth references for benchmarks, on the same thread split as the steps.
void probe_streams(const std::vector<void*>& rw, const void* r, int64_t numel, int32_t dtype, int num_threads,
                   bool nontemporal = false);
void triad(float* a, const float* b, const float* c, float s, int64_t numel, int num_threads);

}  // namespace cpu
}  // namespace fusedoptim
