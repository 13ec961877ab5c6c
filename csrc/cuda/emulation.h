// Host emulation of the few CUDA built-ins the kernels of mta.h use, so the
// same kernel source compiles as plain C++ and runs on a CPU (tests, CI).
//
// Note [CUDA emulation]
// A launch runs its grid one block after another and, inside a block, one
// thread after another, each to completion. That is a valid schedule only
// for kernels whose threads never wait for each other, which is the rule for
// every kernel in mta.h: no __syncthreads, no shared memory, no warp
// intrinsics (none is defined here, so using one fails to compile). Each
// thread owns disjoint elements, so the result does not depend on the order.
// The arithmetic intrinsics map to correctly rounded host operations; with
// -ffp-contract=off the host computes exactly what the device computes.
#pragma once

#if defined(__CUDACC__)
#error "emulation.h is for host compilers; nvcc builds the real kernels"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace fusedoptim {
namespace emu {
// The coordinates of the emulated thread that runs now.
inline thread_local dim3 block_idx, thread_idx, block_dim, grid_dim;
}  // namespace emu
}  // namespace fusedoptim

#define blockIdx (::fusedoptim::emu::block_idx)
#define threadIdx (::fusedoptim::emu::thread_idx)
#define blockDim (::fusedoptim::emu::block_dim)
#define gridDim (::fusedoptim::emu::grid_dim)

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

namespace fusedoptim {
namespace emu {

// kernel<<<grid, block>>>(args...) on the host; see Note [CUDA emulation].
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args&&... args) {
  grid_dim = grid;
  block_dim = block;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    for (unsigned tx = 0; tx < block.x; ++tx) {
      block_idx = dim3(bx);
      thread_idx = dim3(tx);
      kernel(args...);
    }
  }
}

}  // namespace emu
}  // namespace fusedoptim
