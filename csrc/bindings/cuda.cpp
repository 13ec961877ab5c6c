// The CUDA backends as Python sees them: _C.cuda (the kernels on a GPU,
// when built with nvcc), _C.cuda_emulation (the same kernels run on the CPU,
// always built) and _C.cuda_info.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "../common/coeffs.h"
#include "../cuda/api.h"
#include "cuda.h"
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

// The precision options of a launch (Note [precision options]); the grad
// multiplier is read on the device from clip_coef (null: 1).
void set_options(cuda::LaunchCommon& c, const Options& o, uintptr_t clip_coef) {
  check_ptr(clip_coef, clip_coef ? 1 : 0, alignof(float), "clip_coef", 0);
  c.state_dtype = o.state_dtype;
  c.store = o.store;
  c.clip_coef = reinterpret_cast<const float*>(clip_coef);
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
using CudaNormFn = cuda::LaunchStats (*)(const cuda::NormRequest&);

py::dict cuda_adam_step(CudaAdamFn fn, py::handle params, py::handle grads, py::handle exp_avgs,
                        py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj,
                        int32_t dtype, double lr, double beta1, double beta2, double eps, double weight_decay,
                        bool decoupled, bool amsgrad, bool maximize, bool device_steps, uintptr_t lr_ptr,
                        uintptr_t grad_scale, uintptr_t found_inf, int device, uintptr_t stream,
                        const std::string& space, int32_t state_dtype, int store, py::handle extras, py::handle ids,
                        uint64_t seed, uintptr_t clip_coef, int32_t step_dtype, py::handle exp_avg_scales,
                        py::handle exp_avg_sq_scales, int64_t block_size) {
  cuda::AdamRequest r;
  r.common = launch_common(dtype, grad_scale, found_inf, device, stream, space);
  const Options o = options(dtype, state_dtype, store, seed);
  set_options(r.common, o, clip_coef);
  if (lr_ptr != 0 && !device_steps) throw py::value_error("lr_ptr needs device_steps=True");
  check_ptr(lr_ptr, lr_ptr ? 1 : 0, alignof(float), "lr_ptr", 0);
  r.hyper = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled);
  r.hyper.q8_block = int32_t(block_size);
  r.wd_mode = adam_wd_mode(weight_decay, decoupled);
  r.amsgrad = amsgrad;
  r.maximize = maximize;
  r.device_steps = device_steps;
  r.lr = lr;
  r.beta1 = beta1;
  r.beta2 = beta2;
  r.weight_decay = weight_decay;
  r.lr_ptr = reinterpret_cast<const float*>(lr_ptr);
  r.seed = o.seed;
  if (device_steps && step_dtype != kFloat32) throw py::value_error("device step counters must be float32");
  AdamLists lists = adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels_obj, o, amsgrad,
                               extras, ids, step_dtype, exp_avg_scales, exp_avg_sq_scales, block_size);
  // Every check has passed: from here on we write. Host step counters are
  // counted here, as the CPU path does (with the stochastic-rounding keys);
  // device ones by a kernel, which also derives the keys from them.
  if (device_steps) {
    r.steps.reserve(lists.steps.size());
    for (const StepRef& s : lists.steps) r.steps.push_back(static_cast<float*>(s.p));
    r.tensor_ids = std::move(lists.ids);
  } else {
    StepCounter(lr, beta1, beta2, o.store, o.seed).count_all(lists.tensors, lists.steps, lists.ids);
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
                       uintptr_t found_inf, int device, uintptr_t stream, const std::string& space,
                       int32_t state_dtype, int store, py::handle extras, py::handle steps, py::handle ids,
                       uint64_t seed, uintptr_t clip_coef, py::handle momentum_scales, int64_t block_size) {
  cuda::SGDRequest r;
  r.common = launch_common(dtype, grad_scale, found_inf, device, stream, space);
  const Options o = options(dtype, state_dtype, store, seed);
  set_options(r.common, o, clip_coef);
  r.hyper = sgd_hyper(lr, weight_decay, momentum, dampening);
  r.hyper.q8_block = int32_t(block_size);
  r.weight_decay = weight_decay != 0.0;
  r.momentum_mode = sgd_momentum_mode(momentum, nesterov);
  r.maximize = maximize;
  SGDLists lists =
      sgd_lists(params, grads, momentum_buffers, first_step, numels_obj, o, momentum != 0.0, extras, steps, ids,
                momentum_scales, block_size);
  // Every check has passed: the host step counters (stochastic rounding) first.
  StepCounter(o.store, o.seed).count_all(lists.tensors, lists.steps, lists.ids);
  r.tensors = std::move(lists.tensors);
  cuda::LaunchStats st;
  {
    py::gil_scoped_release release;
    st = fn(r);
  }
  return stats_dict(st);
}

// The tensor list of a grad-norm call, parsed and checked (pointers unused
// for sizing).
cuda::NormRequest norm_request(py::handle grads, py::handle numels_obj, const std::vector<int32_t>& dtypes) {
  cuda::NormRequest r;
  r.numels = counts(numels_obj);
  const size_t n = r.numels.size();
  if (dtypes.size() != n) {
    throw py::value_error("dtypes has " + std::to_string(dtypes.size()) + " entries, expected " + std::to_string(n));
  }
  for (int32_t d : dtypes) check_dtype(d);
  r.dtypes = dtypes;
  if (!grads.is_none()) {
    const auto g = addresses(grads, "grads", n);
    for (size_t k = 0; k < n; ++k) {
      check_ptr(g[k], r.numels[k], dtype_size(dtypes[k]), "grads", k);
      r.grads.push_back(reinterpret_cast<const void*>(g[k]));
    }
  } else {
    r.grads.assign(n, nullptr);
  }
  return r;
}

int64_t grad_norm_scratch(py::handle numels, const std::vector<int32_t>& dtypes) {
  return cuda::emu::norm_scratch_len(norm_request(py::none(), numels, dtypes));
}

py::dict cuda_grad_norm(CudaNormFn fn, py::handle grads, py::handle numels, const std::vector<int32_t>& dtypes,
                        uintptr_t scratch, int64_t scratch_len, uintptr_t out, double max_norm, uintptr_t grad_scale,
                        int device, uintptr_t stream, const std::string& space) {
  cuda::NormRequest r = norm_request(grads, numels, dtypes);
  r.common = launch_common(kFloat32, grad_scale, 0, device, stream, space);
  // A domain check kept here: tests/test_precision_cuda_emulation.py calls
  // grad_norm directly and expects ValueError.
  if (!(std::isfinite(max_norm) && max_norm > 0.0)) {
    throw py::value_error("max_norm must be positive and finite, got " + std::to_string(max_norm));
  }
  const int64_t needed = cuda::emu::norm_scratch_len(r);
  if (scratch_len < needed) {
    throw py::value_error("scratch holds " + std::to_string(scratch_len) + " float64 entries, " +
                          std::to_string(needed) + " needed (grad_norm_scratch)");
  }
  check_ptr(scratch, needed, alignof(double), "scratch", 0);
  if (out == 0) throw py::value_error("out is a null pointer");
  check_ptr(out, 2, alignof(float), "out", 0);
  r.scratch = reinterpret_cast<double*>(scratch);
  r.scratch_len = scratch_len;
  r.out = reinterpret_cast<float*>(out);
  r.max_norm = float(max_norm);
  cuda::LaunchStats st;
  {
    py::gil_scoped_release release;
    st = fn(r);
  }
  return stats_dict(st);
}

// Registers adam_step/sgd_step/grad_norm of one CUDA backend on module m.
void def_cuda_backend(py::module_& m, CudaAdamFn adam, CudaSGDFn sgd, CudaNormFn norm) {
  m.def(
      "adam_step",
      [adam](py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
             py::handle max_exp_avg_sqs, py::handle steps, py::handle numels, int32_t dtype, double lr, double beta1,
             double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
             bool device_steps, uintptr_t lr_ptr, uintptr_t grad_scale, uintptr_t found_inf, int device,
             uintptr_t stream, const std::string& param_space, int32_t state_dtype, int store, py::handle extras,
             py::handle tensor_ids, uint64_t seed, uintptr_t clip_coef, int32_t step_dtype,
             py::handle exp_avg_scales, py::handle exp_avg_sq_scales, int64_t block_size) {
        return cuda_adam_step(adam, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels, dtype, lr,
                              beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, device_steps, lr_ptr,
                              grad_scale, found_inf, device, stream, param_space, state_dtype, store, extras,
                              tensor_ids, seed, clip_coef, step_dtype, exp_avg_scales, exp_avg_sq_scales, block_size);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
      py::arg("steps"), py::arg("numels"), py::arg("dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("device_steps") = false, py::arg("lr_ptr") = 0, py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
      py::arg("device") = 0, py::arg("stream") = 0, py::arg("param_space") = "auto", py::kw_only(),
      py::arg("state_dtype") = -1, py::arg("store") = 0, py::arg("extras") = py::none(),
      py::arg("tensor_ids") = py::none(), py::arg("seed") = 0, py::arg("clip_coef") = 0,
      py::arg("step_dtype") = int(kFloat32), py::arg("exp_avg_scales") = py::none(),
      py::arg("exp_avg_sq_scales") = py::none(), py::arg("block_size") = 0,
      "Multi-tensor Adam/AdamW launch(es) on `stream` of `device`. Returns launch statistics.\n"
      "step_dtype: DTYPE_FLOAT64 for float64 host step counters (device counters are float32).\n"
      "Precision options and 8-bit states as _C.adam_step; clip_coef: address of a float32 on the device that multiplies\n"
      "the grads (0: none); with device_steps and stochastic rounding the keys come from the device steps.");
  m.def(
      "sgd_step",
      [sgd](py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
            py::handle numels, int32_t dtype, double lr, double weight_decay, double momentum, double dampening,
            bool nesterov, bool maximize, uintptr_t grad_scale, uintptr_t found_inf, int device, uintptr_t stream,
            const std::string& param_space, int32_t state_dtype, int store, py::handle extras, py::handle steps,
            py::handle tensor_ids, uint64_t seed, uintptr_t clip_coef, py::handle momentum_scales,
            int64_t block_size) {
        return cuda_sgd_step(sgd, params, grads, momentum_buffers, first_step, numels, dtype, lr, weight_decay,
                             momentum, dampening, nesterov, maximize, grad_scale, found_inf, device, stream,
                             param_space, state_dtype, store, extras, steps, tensor_ids, seed, clip_coef,
                             momentum_scales, block_size);
      },
      py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("first_step"), py::arg("numels"),
      py::arg("dtype"), py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"),
      py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale") = 0, py::arg("found_inf") = 0,
      py::arg("device") = 0, py::arg("stream") = 0, py::arg("param_space") = "auto", py::kw_only(),
      py::arg("state_dtype") = -1, py::arg("store") = 0, py::arg("extras") = py::none(),
      py::arg("steps") = py::none(), py::arg("tensor_ids") = py::none(), py::arg("seed") = 0,
      py::arg("clip_coef") = 0, py::arg("momentum_scales") = py::none(), py::arg("block_size") = 0,
      "Multi-tensor SGD launch(es) on `stream` of `device`. Returns launch statistics.\n"
      "Precision options and 8-bit states as _C.sgd_step (steps: host float32 counters, stochastic rounding only, incremented\n"
      "here); clip_coef as in adam_step.");
  m.def(
      "grad_norm",
      [norm](py::handle grads, py::handle numels, std::vector<int32_t> dtypes, uintptr_t scratch, int64_t scratch_len,
             uintptr_t out, double max_norm, uintptr_t grad_scale, int device, uintptr_t stream,
             const std::string& param_space) {
        return cuda_grad_norm(norm, grads, numels, dtypes, scratch, scratch_len, out, max_norm, grad_scale, device,
                              stream, param_space);
      },
      py::arg("grads"), py::arg("numels"), py::arg("dtypes"), py::arg("scratch"), py::arg("scratch_len"),
      py::arg("out"), py::arg("max_norm"), py::arg("grad_scale") = 0, py::arg("device") = 0, py::arg("stream") = 0,
      py::arg("param_space") = "auto",
      "Global L2 norm of the grads (mixed dtypes), deterministic, on `stream` of `device`: out[0] = norm,\n"
      "out[1] = clip_grad_norm_'s coefficient for max_norm (float32). scratch: float64 device buffer of\n"
      "grad_norm_scratch(numels, dtypes) entries. With grad_scale the grads are unscaled as the update reads\n"
      "them. Returns launch statistics (blocks: stage-1 blocks).");
  m.def("grad_norm_scratch", &grad_norm_scratch, py::arg("numels"), py::arg("dtypes"),
        "float64 scratch entries grad_norm needs for these grads (either parameter block).");
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
  d["reason"] =
      "this build of fusedoptim has no CUDA backend (built where no GPU was found; "
      "FUSEDOPTIM_CUDA=ON at build time asks for it: see the README's CUDA section)";
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
  def_cuda_backend(emu, &cuda::emu::adam_step, &cuda::emu::sgd_step, &cuda::emu::grad_norm);
  m.def("cuda_info", &cuda_info, "Whether the CUDA backend was compiled and can run here, and why not.");
#if FUSEDOPTIM_HAVE_CUDA
  py::module_ gpu = m.def_submodule("cuda", "The CUDA kernels; device pointers, launched on the given stream.");
  def_cuda_backend(gpu, &cuda::real::adam_step, &cuda::real::sgd_step, &cuda::real::grad_norm);
#endif
}

}  // namespace bind
}  // namespace fusedoptim
