// The CUDA backends as Python sees them: _C.cuda (the kernels on a GPU,
// when built with nvcc), _C.cuda_emulation (the same kernels run on the CPU,
// always built) and _C.cuda_info.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cuda/api.h"
#include "parse.h"

#ifndef FUSEDOPTIM_HAVE_CUDA
#define FUSEDOPTIM_HAVE_CUDA 0
#endif

namespace fusedoptim {
namespace bind {

namespace {

// ---------------------------------------------------------------------------
// The CUDA backend (cuda::real, when built with nvcc) and its emulation on
// the CPU (cuda::emu, always built). Both take the same arguments; pointers
// are device addresses for the real one and host addresses for the emulation.

cuda::ParamSpace param_space(const std::string& name) {
  if (name == "auto") return cuda::ParamSpace::kAuto;
  if (name == "large") return cuda::ParamSpace::kLarge;
  if (name == "small") return cuda::ParamSpace::kSmall;
  throw py::value_error("param_space must be 'auto', 'large' or 'small', got '" + name + "'");
}

cuda::LaunchCommon launch_common(int32_t dtype, uintptr_t grad_scale, uintptr_t found_inf, int device,
                                 uintptr_t stream, const std::string& space) {
  check_dtype(dtype);
  if (device < 0) throw py::value_error("device must be a CUDA device index");
  check_ptr(grad_scale, grad_scale ? 1 : 0, alignof(float), "grad_scale", 0);
  check_ptr(found_inf, found_inf ? 1 : 0, alignof(float), "found_inf", 0);
  cuda::LaunchCommon c;
  c.dtype = dtype;
  c.device = device;
  c.stream = stream;
  c.space = param_space(space);
  c.grad_scale = reinterpret_cast<const float*>(grad_scale);
  c.found_inf = reinterpret_cast<const float*>(found_inf);
  return c;
}

py::dict stats_dict(const cuda::LaunchStats& st) {
  py::dict d;
  d["launches"] = st.launches;
  d["blocks"] = st.blocks;
  d["max_tensors_per_launch"] = st.max_tensors_per_launch;
  d["capacity"] = st.capacity;
  d["param_bytes"] = st.param_bytes;
  return d;
}

using CudaAdamFn = cuda::LaunchStats (*)(const cuda::AdamRequest&);
using CudaSGDFn = cuda::LaunchStats (*)(const cuda::SGDRequest&);

py::dict cuda_adam_step(CudaAdamFn fn, py::handle params, py::handle grads, py::handle exp_avgs,
                        py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj,
                        int32_t dtype, double lr, double beta1, double beta2, double eps, double weight_decay,
                        bool decoupled, bool amsgrad, bool maximize, bool device_steps, uintptr_t lr_ptr,
                        uintptr_t grad_scale, uintptr_t found_inf, int device, uintptr_t stream,
                        const std::string& space) {
  cuda::AdamRequest r;
  r.common = launch_common(dtype, grad_scale, found_inf, device, stream, space);
  const AdamCall call = adam_call(lr, beta1, beta2, eps, weight_decay, decoupled);
  if (lr_ptr != 0 && !device_steps) throw py::value_error("lr_ptr needs device_steps=True");
  check_ptr(lr_ptr, lr_ptr ? 1 : 0, alignof(float), "lr_ptr", 0);
  r.hyper = call.hyper;
  r.wd_mode = call.wd_mode;
  r.amsgrad = amsgrad;
  r.maximize = maximize;
  r.device_steps = device_steps;
  r.lr = lr;
  r.beta1 = beta1;
  r.beta2 = beta2;
  r.weight_decay = weight_decay;
  r.lr_ptr = reinterpret_cast<const float*>(lr_ptr);
  const Options o = options(dtype, -1, kStorePlain, 0, 1.0);
  AdamLists lists = adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels_obj, o, amsgrad);
  // Every check has passed: from here on we write. Host step counters are
  // counted here, as the CPU path does; device ones by a kernel.
  if (device_steps) {
    r.steps = std::move(lists.steps);
  } else {
    count_host_steps(lists, lr, beta1, beta2, o);
  }
  r.tensors = std::move(lists.tensors);
  cuda::LaunchStats st;
  {
    py::gil_scoped_release release;
    st = fn(r);
  }
  return stats_dict(st);
}

py::dict cuda_sgd_step(CudaSGDFn fn, py::handle params, py::handle grads, py::handle momentum_buffers,
                       py::handle first_step, py::handle numels_obj, int32_t dtype, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize, uintptr_t grad_scale,
                       uintptr_t found_inf, int device, uintptr_t stream, const std::string& space) {
  cuda::SGDRequest r;
  r.common = launch_common(dtype, grad_scale, found_inf, device, stream, space);
  const SGDCall call = sgd_call(lr, weight_decay, momentum, dampening, nesterov);
  r.hyper = call.hyper;
  r.weight_decay = weight_decay != 0.0;
  r.momentum_mode = call.momentum_mode;
  r.maximize = maximize;
  const Options o = options(dtype, -1, kStorePlain, 0, 1.0);
  r.tensors = sgd_lists(params, grads, momentum_buffers, first_step, numels_obj, o, momentum != 0.0).tensors;
  cuda::LaunchStats st;
  {
    py::gil_scoped_release release;
    st = fn(r);
  }
  return stats_dict(st);
}

// Registers adam_step/sgd_step of one CUDA backend on module m.
void def_cuda_backend(py::module_& m, CudaAdamFn adam, CudaSGDFn sgd) {
  m.def(
      "adam_step",
      [adam](py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
             py::handle max_exp_avg_sqs, py::handle steps, py::handle numels, int32_t dtype, double lr, double beta1,
             double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
             bool device_steps, uintptr_t lr_ptr, uintptr_t grad_scale, uintptr_t found_inf, int device,
             uintptr_t stream, const std::string& param_space) {
        return cuda_adam_step(adam, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels, dtype, lr,
                              beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, device_steps, lr_ptr,
                              grad_scale, found_inf, device, stream, param_space);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
      py::arg("steps"), py::arg("numels"), py::arg("dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("device_steps") = false, py::arg("lr_ptr") = 0, py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
      py::arg("device") = 0, py::arg("stream") = 0, py::arg("param_space") = "auto",
      "Multi-tensor Adam/AdamW launch(es) on `stream` of `device`. Returns launch statistics.");
  m.def(
      "sgd_step",
      [sgd](py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
            py::handle numels, int32_t dtype, double lr, double weight_decay, double momentum, double dampening,
            bool nesterov, bool maximize, uintptr_t grad_scale, uintptr_t found_inf, int device, uintptr_t stream,
            const std::string& param_space) {
        return cuda_sgd_step(sgd, params, grads, momentum_buffers, first_step, numels, dtype, lr, weight_decay,
                             momentum, dampening, nesterov, maximize, grad_scale, found_inf, device, stream,
                             param_space);
      },
      py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("first_step"), py::arg("numels"),
      py::arg("dtype"), py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"),
      py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
      py::arg("device") = 0, py::arg("stream") = 0, py::arg("param_space") = "auto",
      "Multi-tensor SGD launch(es) on `stream` of `device`. Returns launch statistics.");
}

py::dict cuda_info() {
  py::dict d;
#if FUSEDOPTIM_HAVE_CUDA
  std::string reason;
  const bool ok = cuda::real::available(&reason);
  d["compiled"] = true;
  d["available"] = ok;
  d["reason"] = ok ? std::string() : reason;
  d["device_count"] = cuda::real::device_count();
  d["driver_version"] = cuda::real::driver_version();
  d["runtime_version"] = cuda::real::runtime_version();
  d["archs"] = cuda::real::compiled_archs();
  d["large_param_space"] = cuda::real::large_param_space();
#else
  d["compiled"] = false;
  d["available"] = false;
  d["reason"] = "this build of fusedoptim has no CUDA backend (built without a CUDA compiler)";
  d["device_count"] = 0;
  d["driver_version"] = 0;
  d["runtime_version"] = 0;
  d["archs"] = std::vector<int>();
  d["large_param_space"] = false;
#endif
  return d;
}

}  // namespace

void def_cuda(py::module_& m) {
  py::module_ emu = m.def_submodule(
      "cuda_emulation", "The CUDA kernels compiled for the host and run on the CPU (tests); host pointers.");
  def_cuda_backend(emu, &cuda::emu::adam_step, &cuda::emu::sgd_step);
  m.def("cuda_info", &cuda_info, "Whether the CUDA backend was compiled and can run here, and why not.");
#if FUSEDOPTIM_HAVE_CUDA
  py::module_ gpu = m.def_submodule("cuda", "The CUDA kernels; device pointers, launched on the given stream.");
  def_cuda_backend(gpu, &cuda::real::adam_step, &cuda::real::sgd_step);
#endif
}

}  // namespace bind
}  // namespace fusedoptim
