// The only file that includes pybind11.
//
// fusedoptim._C takes plain values: data pointers as Python ints, element
// counts, dtype codes and hyperparameters. It never sees a torch object and
// links no torch library, so one build serves every torch version. Python
// (fusedoptim/_backend.py) validates tensors before calling in; the checks
// here are a second line that guards memory safety, and they all run before
// anything is written.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "../common/params.h"
#include "../common/update_math.h"
#include "../cpu/cpu_features.h"
#include "../cpu/dispatch.h"
#include "../cpu/thread_pool.h"

namespace py = pybind11;
using namespace fusedoptim;

namespace {

// Python list of ints -> addresses. Much cheaper than the generic caster for
// the thousands of pointers a large model passes on every step.
std::vector<uintptr_t> addresses(const py::handle& obj, const char* what, size_t expect) {
  if (!PyList_Check(obj.ptr())) throw py::type_error(std::string(what) + " must be a list of ints");
  const Py_ssize_t n = PyList_GET_SIZE(obj.ptr());
  if (size_t(n) != expect) {
    throw py::value_error(std::string(what) + " has " + std::to_string(n) + " entries, expected " + std::to_string(expect));
  }
  std::vector<uintptr_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned long long v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(obj.ptr(), i));
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
    out[size_t(i)] = uintptr_t(v);
  }
  return out;
}

std::vector<int64_t> counts(const py::handle& obj) {
  if (!PyList_Check(obj.ptr())) throw py::type_error("numels must be a list of ints");
  const Py_ssize_t n = PyList_GET_SIZE(obj.ptr());
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PyList_GET_ITEM(obj.ptr(), i));
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (v < 0) throw py::value_error("numels must be non-negative");
    out[size_t(i)] = v;
  }
  return out;
}

void check_dtype(int32_t dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
    throw py::value_error("unsupported dtype code " + std::to_string(dtype));
  }
}

void check_finite(double v, const char* name, bool allow_negative = false) {
  if (!std::isfinite(v) || (!allow_negative && v < 0)) {
    throw py::value_error(std::string("Invalid ") + name + " value: " + std::to_string(v));
  }
}

void check_ptr(uintptr_t p, int64_t numel, size_t align, const char* what, size_t k) {
  if (numel == 0) return;
  if (p == 0) throw py::value_error(std::string(what) + "[" + std::to_string(k) + "] is a null pointer");
  if (p % align != 0) throw py::value_error(std::string(what) + "[" + std::to_string(k) + "] is misaligned for its dtype");
}

int resolve_threads(int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be at least 1");
  return num_threads;
}

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj, int32_t dtype,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               bool amsgrad, bool maximize, int num_threads) {
  check_dtype(dtype);
  check_finite(lr, "learning rate");
  check_finite(eps, "epsilon");
  check_finite(weight_decay, "weight_decay");
  if (!(beta1 >= 0.0 && beta1 < 1.0)) throw py::value_error("Invalid beta parameter at index 0: " + std::to_string(beta1));
  if (!(beta2 >= 0.0 && beta2 < 1.0)) throw py::value_error("Invalid beta parameter at index 1: " + std::to_string(beta2));
  const int threads = resolve_threads(num_threads);
  const std::vector<int64_t> numels = counts(numels_obj);
  const size_t n = numels.size();
  const auto p = addresses(params, "params", n);
  const auto g = addresses(grads, "grads", n);
  const auto m = addresses(exp_avgs, "exp_avgs", n);
  const auto v = addresses(exp_avg_sqs, "exp_avg_sqs", n);
  std::vector<uintptr_t> vmax;
  if (amsgrad) {
    if (max_exp_avg_sqs.is_none()) throw py::value_error("amsgrad=True needs max_exp_avg_sqs");
    vmax = addresses(max_exp_avg_sqs, "max_exp_avg_sqs", n);
  }
  const auto s = addresses(steps, "steps", n);
  const size_t align = dtype_size(dtype);
  for (size_t k = 0; k < n; ++k) {
    check_ptr(p[k], numels[k], align, "params", k);
    check_ptr(g[k], numels[k], align, "grads", k);
    check_ptr(m[k], numels[k], align, "exp_avgs", k);
    check_ptr(v[k], numels[k], align, "exp_avg_sqs", k);
    if (amsgrad) check_ptr(vmax[k], numels[k], align, "max_exp_avg_sqs", k);
    check_ptr(s[k], 1, alignof(float), "steps", k);
  }

  AdamHyper h;
  h.one_minus_beta1 = float(1.0 - beta1);
  h.beta2 = float(beta2);
  h.one_minus_beta2 = float(1.0 - beta2);
  h.eps = float(eps);
  h.weight_decay = float(weight_decay);
  h.decay = decoupled ? float(1.0 - lr * weight_decay) : 1.0f;
  const int wd_mode = weight_decay == 0.0 ? kNoDecay : (decoupled ? kDecoupled : kL2);

  py::gil_scoped_release release;
  std::vector<AdamTensor> ts(n);
  for (size_t k = 0; k < n; ++k) {
    // Every check has passed: from here on we write. The step counter is a
    // float32 scalar incremented in fp32, as torch does with `step_t += 1`.
    float* step = reinterpret_cast<float*>(s[k]);
    *step += 1.0f;
    ts[k].param = reinterpret_cast<void*>(p[k]);
    ts[k].grad = reinterpret_cast<const void*>(g[k]);
    ts[k].exp_avg = reinterpret_cast<void*>(m[k]);
    ts[k].exp_avg_sq = reinterpret_cast<void*>(v[k]);
    ts[k].max_exp_avg_sq = amsgrad ? reinterpret_cast<void*>(vmax[k]) : nullptr;
    ts[k].numel = numels[k];
    ts[k].coeffs = cpu::adam_coeffs(lr, beta1, beta2, double(*step));
  }
  cpu::adam_step(ts, h, dtype, wd_mode, amsgrad, maximize, threads);
}

void sgd_step(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
              py::handle numels_obj, int32_t dtype, double lr, double weight_decay, double momentum,
              double dampening, bool nesterov, bool maximize, int num_threads) {
  check_dtype(dtype);
  check_finite(lr, "learning rate");
  check_finite(weight_decay, "weight_decay");
  check_finite(momentum, "momentum value");
  check_finite(dampening, "dampening value", /*allow_negative=*/true);
  if (nesterov && (momentum <= 0.0 || dampening != 0.0)) {
    throw py::value_error("Nesterov momentum requires a momentum and zero dampening");
  }
  const int threads = resolve_threads(num_threads);
  const std::vector<int64_t> numels = counts(numels_obj);
  const size_t n = numels.size();
  const auto p = addresses(params, "params", n);
  const auto g = addresses(grads, "grads", n);
  const bool use_momentum = momentum != 0.0;
  std::vector<uintptr_t> b;
  std::vector<char> first(n, 0);
  if (use_momentum) {
    if (momentum_buffers.is_none() || first_step.is_none()) {
      throw py::value_error("momentum != 0 needs momentum_buffers and first_step");
    }
    b = addresses(momentum_buffers, "momentum_buffers", n);
    if (!PyList_Check(first_step.ptr()) || size_t(PyList_GET_SIZE(first_step.ptr())) != n) {
      throw py::value_error("first_step must be a list of bools, one per tensor");
    }
    for (size_t k = 0; k < n; ++k) first[k] = char(PyObject_IsTrue(PyList_GET_ITEM(first_step.ptr(), Py_ssize_t(k))) == 1);
  }
  const size_t align = dtype_size(dtype);
  for (size_t k = 0; k < n; ++k) {
    check_ptr(p[k], numels[k], align, "params", k);
    check_ptr(g[k], numels[k], align, "grads", k);
    if (use_momentum) check_ptr(b[k], numels[k], align, "momentum_buffers", k);
  }

  SGDHyper h;
  h.neg_lr = float(-lr);
  h.weight_decay = float(weight_decay);
  h.momentum = float(momentum);
  h.one_minus_dampening = float(1.0 - dampening);
  const int mode = !use_momentum ? kNoMomentum : (nesterov ? kNesterov : kMomentum);

  py::gil_scoped_release release;
  std::vector<SGDTensor> ts(n);
  for (size_t k = 0; k < n; ++k) {
    ts[k].param = reinterpret_cast<void*>(p[k]);
    ts[k].grad = reinterpret_cast<const void*>(g[k]);
    ts[k].momentum_buffer = use_momentum ? reinterpret_cast<void*>(b[k]) : nullptr;
    ts[k].numel = numels[k];
    ts[k].first_step = first[k] != 0;
  }
  cpu::sgd_step(ts, h, dtype, weight_decay != 0.0, mode, maximize, threads);
}

void stream_probe(py::handle rw_obj, uintptr_t read, int64_t numel, int32_t dtype, int num_threads) {
  check_dtype(dtype);
  if (numel < 0) throw py::value_error("numel must be non-negative");
  if (!PyList_Check(rw_obj.ptr())) throw py::type_error("rw must be a list of ints");
  const auto rw = addresses(rw_obj, "rw", size_t(PyList_GET_SIZE(rw_obj.ptr())));
  if (rw.empty() || rw.size() > 4) throw py::value_error("stream_probe takes 1 to 4 read-write streams");
  const size_t align = dtype_size(dtype);
  check_ptr(read, numel, align, "read", 0);
  std::vector<void*> ptrs;
  for (size_t k = 0; k < rw.size(); ++k) {
    check_ptr(rw[k], numel, align, "rw", k);
    ptrs.push_back(reinterpret_cast<void*>(rw[k]));
  }
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release release;
  cpu::probe_streams(ptrs, reinterpret_cast<const void*>(read), numel, dtype, threads);
}

void triad(uintptr_t a, uintptr_t b, uintptr_t c, double s, int64_t numel, int num_threads) {
  if (numel < 0) throw py::value_error("numel must be non-negative");
  check_ptr(a, numel, 4, "a", 0);
  check_ptr(b, numel, 4, "b", 0);
  check_ptr(c, numel, 4, "c", 0);
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release release;
  cpu::triad(reinterpret_cast<float*>(a), reinterpret_cast<const float*>(b), reinterpret_cast<const float*>(c),
             float(s), numel, threads);
}

py::dict backend_info() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  py::dict features;
  features["x86"] = f.x86;
  features["avx"] = f.avx;
  features["avx2"] = f.avx2;
  features["fma"] = f.fma;
  features["f16c"] = f.f16c;
  features["avx512f"] = f.avx512f;
  features["avx512bw"] = f.avx512bw;
  features["avx512vl"] = f.avx512vl;
  features["avx512_bf16"] = f.avx512_bf16;
  features["os_avx"] = f.os_avx;
  features["os_avx512"] = f.os_avx512;
  py::dict info;
  info["version"] = FUSEDOPTIM_VERSION;
  info["compiled_isas"] = cpu::compiled_isas();
  info["supported_isas"] = cpu::supported_isas();
  info["isa"] = std::string(cpu::active_kernels().isa);
  info["vector_width"] = cpu::active_kernels().vector_width;
  info["cpu_features"] = features;
  info["thread_pool_size"] = cpu::pool_size();
  info["threading"] = "fusedoptim thread pool (no OpenMP)";
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cuda_compiled"] = false;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedoptim native kernels (private; use the fusedoptim package)";
  m.attr("DTYPE_FLOAT32") = int(kFloat32);
  m.attr("DTYPE_BFLOAT16") = int(kBFloat16);
  m.attr("DTYPE_FLOAT16") = int(kFloat16);

  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("numels"),
        py::arg("dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("num_threads"),
        "Fused Adam/AdamW update of many tensors in one call. Pointers are data addresses; "
        "steps point at float32 step counters, incremented in place before use.");
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("first_step"), py::arg("numels"), py::arg("dtype"), py::arg("lr"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("num_threads"),
        "Fused SGD update of many tensors in one call. first_step[k] marks a momentum buffer "
        "that this call initialises with the gradient.");
  m.def("stream_probe", &stream_probe, py::arg("rw"), py::arg("read"), py::arg("numel"), py::arg("dtype"),
        py::arg("num_threads"),
        "Bandwidth probe: x += read for each read-write stream x (1 to 4), on the optimizer's "
        "thread split; moves exactly the bytes of a step with the same streams.");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("scalar"), py::arg("numel"),
        py::arg("num_threads"), "STREAM triad a = b + scalar * c over fp32 arrays.");
  m.def("backend_info", &backend_info, "What was compiled, the CPU features found and the ISA in use.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name); }, py::arg("name"),
        "Force a CPU variant: 'scalar', 'avx2' or 'avx512'.");
  m.def("get_cpu_isa", [] { return std::string(cpu::active_kernels().isa); });
}
