// The CUDA backend: the kernels of mta_kernels.h built by nvcc, launched on the
// caller's stream of the params' device. Every CUDA call is checked and a
// failure becomes std::runtime_error with CUDA's own text (a Python
// RuntimeError through the bindings).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#if CUDART_VERSION >= 12010
#define FO_MTA_LARGE 1
#else
#define FO_MTA_LARGE 0
#endif
// A CUDA 12.x runtime may meet a 12.0 driver (minor version compatibility),
// which refuses the large parameter block; 13.x needs a newer driver anyway.
#if CUDART_VERSION < 13000
#define FO_MTA_SMALL 1
#else
#define FO_MTA_SMALL 0
#endif
#include "launch.h"

namespace fusedoptim {
namespace cuda {
namespace real {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("fusedoptim CUDA: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the call and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

struct DeviceLauncher {
  cudaStream_t stream;
  template <class Args>
  void launch(void (*kernel)(Args), int64_t blocks, const Args& args) {
    if (blocks > 0x7fffffff) throw std::runtime_error("fusedoptim CUDA: grid too large");
    kernel<<<dim3(unsigned(blocks)), dim3(kBlockThreads), 0, stream>>>(args);
    check(cudaGetLastError(), "kernel launch");
  }
  // The grad-norm kernels synchronise their block (__syncthreads): on a GPU
  // an ordinary launch.
  template <class Args>
  void launch_cooperative(void (*kernel)(Args), int64_t blocks, const Args& args) {
    launch(kernel, blocks, args);
  }
};

}  // namespace

bool large_param_space() {
#if FO_MTA_LARGE
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess && v >= 12010;
#else
  return false;
#endif
}

LaunchStats adam_step(const AdamRequest& r) {
  DeviceGuard guard(r.common.device);
  DeviceLauncher l{reinterpret_cast<cudaStream_t>(r.common.stream)};
  return dispatch(r, l, large_param_space());
}

LaunchStats sgd_step(const SGDRequest& r) {
  DeviceGuard guard(r.common.device);
  DeviceLauncher l{reinterpret_cast<cudaStream_t>(r.common.stream)};
  return dispatch(r, l, large_param_space());
}

LaunchStats grad_norm(const NormRequest& r) {
  DeviceGuard guard(r.common.device);
  DeviceLauncher l{reinterpret_cast<cudaStream_t>(r.common.stream)};
  return dispatch(r, l, large_param_space());
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

bool available(std::string* reason) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    *reason = std::string("no usable CUDA driver or device: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
    return false;
  }
  if (n == 0) {
    *reason = "no CUDA device found";
    return false;
  }
  reason->clear();
  return true;
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int runtime_version() { return CUDART_VERSION; }

std::vector<int> compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
  std::vector<int> archs = {__CUDA_ARCH_LIST__};  // 800, 860, ...
  for (int& a : archs) a /= 10;                   // as in sm_80
  return archs;
#else
  return {};
#endif
}

}  // namespace real
}  // namespace cuda
}  // namespace fusedoptim
