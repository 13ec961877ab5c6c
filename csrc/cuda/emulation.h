// Host emulation of the few CUDA built-ins the kernels of mta_kernels.h use, so the
// same kernel source compiles as plain C++ and runs on a CPU (tests, CI).
//
// Note [CUDA emulation]
// A launch runs its grid one block after another and, inside a block, one
// thread after another, each to completion. That is a valid schedule only
// for kernels whose threads never wait for each other, which is the rule for
// the update kernels of mta_kernels.h: each thread owns disjoint elements, so the
// result does not depend on the order.
// The reductions of the grad norm need a block barrier: they are launched
// with launch_cooperative(), which runs each thread of a block as a fiber
// (ucontext) on the calling OS thread; __syncthreads() switches to the next
// fiber until every live thread of the block has reached it, and
// __shared__ variables are static thread_local, shared by the fibers of the
// one block that runs at a time. __syncthreads() in a plain launch throws.
// No warp intrinsic is defined here, so using one fails to compile.
// The arithmetic intrinsics map to correctly rounded host operations; with
// -ffp-contract=off the host computes exactly what the device computes.
#pragma once

#if defined(__CUDACC__)
#error "emulation.h is for host compilers; nvcc builds the real kernels"
#endif

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() ::fusedoptim::emu::sync_threads()

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

// The fibers of the block that runs now in a cooperative launch.
struct Fibers {
  static constexpr size_t kStack = 64 * 1024;
  ucontext_t main;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  unsigned current = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};
inline thread_local Fibers* fibers = nullptr;

inline void sync_threads() {
  Fibers* f = fibers;
  if (f == nullptr) throw std::logic_error("__syncthreads() in an emulated launch that is not cooperative");
  swapcontext(&f->ctx[f->current], &f->main);
}

inline void fiber_entry() {
  Fibers* f = fibers;
  f->body(f->arg);
  f->done[f->current] = 1;  // returns to f->main through uc_link
}

// As launch(), for kernels that use __syncthreads() and __shared__.
template <class Args>
void launch_cooperative(void (*kernel)(const Args&), dim3 grid, dim3 block, const Args& args) {
  struct Call {
    void (*kernel)(const Args&);
    const Args* args;
    static void run(void* p) {
      const Call* c = static_cast<const Call*>(p);
      c->kernel(*c->args);
    }
  } call{kernel, &args};
  Fibers f;
  f.ctx.resize(block.x);
  f.done.resize(block.x);
  for (unsigned t = 0; t < block.x; ++t) f.stacks.emplace_back(new char[Fibers::kStack]);
  f.body = &Call::run;
  f.arg = &call;
  Fibers* const saved = fibers;
  fibers = &f;
  grid_dim = grid;
  block_dim = block;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    block_idx = dim3(bx);
    for (unsigned t = 0; t < block.x; ++t) {
      f.done[t] = 0;
      getcontext(&f.ctx[t]);
      f.ctx[t].uc_stack.ss_sp = f.stacks[t].get();
      f.ctx[t].uc_stack.ss_size = Fibers::kStack;
      f.ctx[t].uc_link = &f.main;
      makecontext(&f.ctx[t], &fiber_entry, 0);
    }
    // Rounds: every live thread runs to its next barrier (or its end).
    for (bool live = true; live;) {
      live = false;
      for (unsigned t = 0; t < block.x; ++t) {
        if (f.done[t]) continue;
        f.current = t;
        thread_idx = dim3(t);
        swapcontext(&f.main, &f.ctx[t]);
        live = live || !f.done[t];
      }
    }
  }
  fibers = saved;
}

}  // namespace emu
}  // namespace fusedoptim
