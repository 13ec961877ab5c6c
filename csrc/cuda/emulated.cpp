// The CUDA kernels of mta_kernels.h, compiled by the host compiler and run on the
// CPU through emulation.h (see Note [CUDA emulation]). The test suite drives
// them with CPU tensors against torch.optim, on every machine.
#include "emulation.h"

#include <stdexcept>
#include <string>

#define FO_MTA_LARGE 1
#define FO_MTA_SMALL 1
#include "launch.h"

namespace fusedoptim {
namespace cuda {
namespace emu {
namespace {

struct HostLauncher {
  template <class Args>
  void launch(void (*kernel)(const Args&), int64_t blocks, const Args& args) {
    if (blocks > 0x7fffffff) throw std::runtime_error("grid too large");
    ::fusedoptim::emu::launch(kernel, dim3(unsigned(blocks)), dim3(kBlockThreads), args);
  }
  template <class Args>
  void launch_cooperative(void (*kernel)(const Args&), int64_t blocks, const Args& args) {
    if (blocks > 0x7fffffff) throw std::runtime_error("grid too large");
    ::fusedoptim::emu::launch_cooperative(kernel, dim3(unsigned(blocks)), dim3(kBlockThreads), args);
  }
};

}  // namespace

LaunchStats adam_step(const AdamRequest& r) {
  HostLauncher l;
  return dispatch(r, l, /*large_ok=*/true);
}

LaunchStats sgd_step(const SGDRequest& r) {
  HostLauncher l;
  return dispatch(r, l, /*large_ok=*/true);
}

LaunchStats grad_norm(const NormRequest& r) {
  HostLauncher l;
  return dispatch(r, l, /*large_ok=*/true);
}

int64_t norm_scratch_len(const NormRequest& r) { return cuda::norm_scratch_len(r); }

}  // namespace emu
}  // namespace cuda
}  // namespace fusedoptim
