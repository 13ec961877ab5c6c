// The module fusedoptim._C: every name it binds, here or through def_cuda
// (cuda.cpp). The binding layer is csrc/bindings (this file, cuda.{h,cpp},
// step_plan.{h,cpp}, parse.h); nothing outside it includes pybind11.
//
// fusedoptim._C takes plain values: data pointers as Python ints, element
// counts, dtype codes and hyperparameters. It never sees a torch object and
// links no torch library, so one build serves every torch version. Python
// (fusedoptim/_routing.py, the specs) validates tensors and hyperparameters before
// calling in; the checks here are a second line that guards memory safety,
// and they all run before anything is written.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../common/coeffs.h"
#include "../common/macros.h"
#include "../common/params.h"
#include "../common/precision.h"
#include "../common/quant8.h"
#include "../cpu/cpu_features.h"
#include "../cpu/dispatch.h"
#include "../cpu/thread_pool.h"
#include "cuda.h"
#include "parse.h"
#include "step_plan.h"

#ifndef FUSEDOPTIM_HAVE_CUDA
#define FUSEDOPTIM_HAVE_CUDA 0
#endif

namespace py = pybind11;
using namespace fusedoptim;
using namespace fusedoptim::bind;

namespace {

// Hyperparameter domains are the Python layer's to check. The two direct
// entry points below keep these checks because tests call them without the
// Python layer and expect ValueError before anything is written
// (tests/test_errors.py; grad_mul: tests/test_precision.py).
void check_finite(double v, const char* name, bool allow_negative = false) {
  if (!std::isfinite(v) || (!allow_negative && v < 0)) {
    throw py::value_error(std::string("Invalid ") + name + " value: " + std::to_string(v));
  }
}

// The multiplier is the clip coefficient: NaN or 0 are legitimate (a
// non-finite grad norm), a negative or larger-than-1 one is not.
void check_grad_mul(double grad_mul) {
  if (!(grad_mul >= 0.0 && grad_mul <= 1.0) && !std::isnan(grad_mul)) {
    throw py::value_error("grad_mul must lie in [0, 1] (or be NaN), got " + std::to_string(grad_mul));
  }
}

void check_adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, double grad_mul) {
  check_finite(lr, "learning rate");
  check_finite(eps, "epsilon");
  check_finite(weight_decay, "weight_decay");
  if (!(beta1 >= 0.0 && beta1 < 1.0)) throw py::value_error("Invalid beta parameter at index 0: " + std::to_string(beta1));
  if (!(beta2 >= 0.0 && beta2 < 1.0)) throw py::value_error("Invalid beta parameter at index 1: " + std::to_string(beta2));
  check_grad_mul(grad_mul);
}

void check_sgd_hyper(double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                     double grad_mul) {
  check_finite(lr, "learning rate");
  check_finite(weight_decay, "weight_decay");
  check_finite(momentum, "momentum value");
  check_finite(dampening, "dampening value", /*allow_negative=*/true);
  if (nesterov && (momentum <= 0.0 || dampening != 0.0)) {
    throw py::value_error("Nesterov momentum requires a momentum and zero dampening");
  }
  check_grad_mul(grad_mul);
}

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj, int32_t dtype,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               bool amsgrad, bool maximize, int num_threads, int32_t state_dtype, int store, py::handle extras,
               py::handle ids, uint64_t seed, double grad_mul, int32_t step_dtype, py::handle exp_avg_scales,
               py::handle exp_avg_sq_scales, int64_t block_size) {
  const Options o = options(dtype, state_dtype, store, seed);
  check_adam_hyper(lr, beta1, beta2, eps, weight_decay, grad_mul);
  AdamHyper hyper = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled);
  hyper.grad_mul = float(grad_mul);
  hyper.q8_block = int32_t(block_size);
  const int threads = resolve_threads(num_threads);
  AdamLists lists = adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels_obj, o, amsgrad,
                               extras, ids, step_dtype, exp_avg_scales, exp_avg_sq_scales, block_size);
  // Every check has passed: from here on we write.
  py::gil_scoped_release release;
  StepCounter(lr, beta1, beta2, o.store, o.seed).count_all(lists.tensors, lists.steps, lists.ids);
  cpu::adam_step(lists.tensors, hyper, cpu::Layout{o.dtype, o.state_dtype, o.store},
                 adam_wd_mode(weight_decay, decoupled), amsgrad, maximize, threads);
}

void sgd_step(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
              py::handle numels_obj, int32_t dtype, double lr, double weight_decay, double momentum,
              double dampening, bool nesterov, bool maximize, int num_threads, int32_t state_dtype, int store,
              py::handle extras, py::handle steps, py::handle ids, uint64_t seed, double grad_mul,
              py::handle momentum_scales, int64_t block_size) {
  const Options o = options(dtype, state_dtype, store, seed);
  check_sgd_hyper(lr, weight_decay, momentum, dampening, nesterov, grad_mul);
  SGDHyper hyper = sgd_hyper(lr, weight_decay, momentum, dampening);
  hyper.grad_mul = float(grad_mul);
  hyper.q8_block = int32_t(block_size);
  const int threads = resolve_threads(num_threads);
  SGDLists lists = sgd_lists(params, grads, momentum_buffers, first_step, numels_obj, o, momentum != 0.0, extras,
                             steps, ids, momentum_scales, block_size);
  py::gil_scoped_release release;
  StepCounter(o.store, o.seed).count_all(lists.tensors, lists.steps, lists.ids);
  cpu::sgd_step(lists.tensors, hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, weight_decay != 0.0,
                sgd_momentum_mode(momentum, nesterov), maximize, threads);
}

// Sum of the squares of every element of the grads, in double, by the fixed
// order of Note [precision options]: the same bits for any thread count
// and CPU variant.
double grad_norm_sq(py::handle grads, py::handle numels_obj, std::vector<int32_t> dtypes, int num_threads) {
  const std::vector<int64_t> numels = counts(numels_obj);
  const size_t n = numels.size();
  const auto g = addresses(grads, "grads", n);
  if (dtypes.size() != n) throw py::value_error("dtypes must have one entry per grad");
  std::vector<cpu::NormTensor> ts(n);
  for (size_t k = 0; k < n; ++k) {
    check_dtype(dtypes[k]);
    check_ptr(g[k], numels[k], dtype_size(dtypes[k]), "grads", k);
    ts[k] = cpu::NormTensor{reinterpret_cast<const void*>(g[k]), numels[k], dtypes[k]};
  }
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release release;
  return cpu::grad_norm_sq(ts, threads);
}

void stream_probe(py::handle rw_obj, uintptr_t read, int64_t numel, int32_t dtype, int num_threads, bool nontemporal) {
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
  cpu::probe_streams(ptrs, reinterpret_cast<const void*>(read), numel, dtype, threads, nontemporal);
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

// Note [8-bit states] for checkpoints: quantize a moment (root: exp_avg_sq,
// quantized as its square root) into codes and scales, or dequantize them.
void q8_quantize(uintptr_t x, int64_t numel, uintptr_t codes, uintptr_t scales, int64_t block, bool root) {
  if (!q8_block_ok(block)) throw py::value_error("block must be a power of two from 64 to 4096");
  if (numel < 0) throw py::value_error("numel must be non-negative");
  check_ptr(x, numel, alignof(float), "x", 0);
  check_ptr(codes, numel, 1, "codes", 0);
  check_ptr(scales, q8_blocks(numel, block), alignof(float), "scales", 0);
  const float* xs = reinterpret_cast<const float*>(x);
  uint8_t* c = reinterpret_cast<uint8_t*>(codes);
  float* s = reinterpret_cast<float*>(scales);
  py::gil_scoped_release release;
  std::vector<float> tmp(size_t(std::min<int64_t>(block, numel)));
  for (int64_t b0 = 0; b0 < numel; b0 += block) {
    const int64_t n = std::min(block, numel - b0);
    if (root) {
      for (int64_t k = 0; k < n; ++k) tmp[size_t(k)] = std::sqrt(xs[b0 + k]);
      s[b0 / block] = q8_quantize_block<false>(tmp.data(), n, c + b0);
    } else {
      s[b0 / block] = q8_quantize_block<true>(xs + b0, n, c + b0);
    }
  }
}

void q8_dequantize(uintptr_t codes, uintptr_t scales, int64_t numel, uintptr_t out, int64_t block, bool root) {
  if (!q8_block_ok(block)) throw py::value_error("block must be a power of two from 64 to 4096");
  if (numel < 0) throw py::value_error("numel must be non-negative");
  check_ptr(out, numel, alignof(float), "out", 0);
  check_ptr(codes, numel, 1, "codes", 0);
  check_ptr(scales, q8_blocks(numel, block), alignof(float), "scales", 0);
  const uint8_t* c = reinterpret_cast<const uint8_t*>(codes);
  const float* s = reinterpret_cast<const float*>(scales);
  float* o = reinterpret_cast<float*>(out);
  py::gil_scoped_release release;
  for (int64_t b0 = 0; b0 < numel; b0 += block) {
    const int64_t n = std::min(block, numel - b0);
    if (root) {
      q8_dequantize_block<false>(c + b0, s[b0 / block], n, o + b0);
    } else {
      q8_dequantize_block<true>(c + b0, s[b0 / block], n, o + b0);
    }
  }
}

py::dict backend_info() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  const std::pair<const char*, bool> flags[] = {
      {"x86", f.x86},           {"amd", f.amd},           {"avx", f.avx},
      {"avx2", f.avx2},         {"fma", f.fma},           {"f16c", f.f16c},
      {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl},
      {"avx512dq", f.avx512dq}, {"avx512_bf16", f.avx512_bf16},
      {"os_avx", f.os_avx},     {"os_avx512", f.os_avx512}};
  py::dict features;
  for (const auto& [name, value] : flags) features[name] = value;
  py::dict info;
  info["version"] = FUSEDOPTIM_VERSION;
  info["compiled_isas"] = cpu::compiled_isas();
  info["supported_isas"] = cpu::supported_isas();
  info["isa"] = std::string(cpu::active_kernels().isa);
  info["vector_width"] = cpu::active_kernels().vector_width;
  info["cpu_features"] = features;
  info["thread_pool_size"] = cpu::pool_size();
  info["threading"] = cpu::threads_backend();
  info["q8_passes"] = cpu::q8_passes();
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cuda_compiled"] = bool(FUSEDOPTIM_HAVE_CUDA);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedoptim native kernels (private; use the fusedoptim package)";
  m.attr("DTYPE_FLOAT32") = int(kFloat32);
  m.attr("DTYPE_BFLOAT16") = int(kBFloat16);
  m.attr("DTYPE_FLOAT16") = int(kFloat16);
  m.attr("DTYPE_FLOAT64") = int(kFloat64);  // step counters only
  m.attr("DTYPE_QUANT8") = int(kQuant8);    // states only (Note [8-bit states])

  m.attr("STORE_PLAIN") = int(kStorePlain);
  m.attr("STORE_MASTER") = int(kStoreMaster);
  m.attr("STORE_STOCHASTIC") = int(kStoreStochastic);
  m.attr("STORE_KAHAN") = int(kStoreKahan);

  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("numels"),
        py::arg("dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("store") = int(kStorePlain),
        py::arg("extras") = py::none(), py::arg("tensor_ids") = py::none(), py::arg("seed") = 0,
        py::arg("grad_mul") = 1.0, py::arg("step_dtype") = int(kFloat32),
        py::arg("exp_avg_scales") = py::none(), py::arg("exp_avg_sq_scales") = py::none(), py::arg("block_size") = 0,
        "Fused Adam/AdamW update of many tensors in one call. Pointers are data addresses; "
        "steps point at step counters (float32, or float64 with step_dtype=DTYPE_FLOAT64), "
        "incremented in place before use. The other keyword "
        "arguments select the precision options of Note [precision options]: the states' dtype "
        "code (-1: the params'), the store mode, its extra stream per tensor (fp32 master or "
        "Kahan compensation), the tensor ids and seed of stochastic rounding, and the factor "
        "(clip coefficient) the grads are multiplied by. With state_dtype=DTYPE_QUANT8 the moments "
        "are uint8 codes with fp32 scales per block of block_size elements (Note [8-bit states]).");
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("first_step"), py::arg("numels"), py::arg("dtype"), py::arg("lr"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1,
        py::arg("store") = int(kStorePlain), py::arg("extras") = py::none(), py::arg("steps") = py::none(),
        py::arg("tensor_ids") = py::none(), py::arg("seed") = 0, py::arg("grad_mul") = 1.0,
        py::arg("momentum_scales") = py::none(), py::arg("block_size") = 0,
        "Fused SGD update of many tensors in one call. first_step[k] marks a momentum buffer "
        "that this call initialises with the gradient. Keyword arguments as for adam_step; "
        "stochastic rounding also takes float32 step counters (incremented in place).");
  m.def("q8_quantize", &q8_quantize, py::arg("x"), py::arg("numel"), py::arg("codes"), py::arg("scales"),
        py::arg("block"), py::arg("root"),
        "Quantize fp32 values into 8-bit codes and per-block scales (Note [8-bit states]); root=True "
        "quantizes the square roots (exp_avg_sq).");
  m.def("q8_dequantize", &q8_dequantize, py::arg("codes"), py::arg("scales"), py::arg("numel"), py::arg("out"),
        py::arg("block"), py::arg("root"),
        "Dequantize 8-bit codes into fp32 values (root=True: the squares, exp_avg_sq).");
  m.def("grad_norm_sq", &grad_norm_sq, py::arg("grads"), py::arg("numels"), py::arg("dtypes"),
        py::arg("num_threads"),
        "Sum of squares of all grad elements in double, in a fixed order (deterministic for any "
        "thread count and CPU variant).");
  m.def("clip_coef", [](double sumsq, double max_norm) {
          float norm = 0.0f;
          const float coef = clip_coef(sumsq, float(max_norm), &norm);
          return py::make_tuple(norm, coef);
        }, py::arg("sumsq"), py::arg("max_norm"),
        "(total_norm, coefficient) of clip_grad_norm_ from a sum of squares, in fp32 as torch computes them.");
  m.def("stream_probe", &stream_probe, py::arg("rw"), py::arg("read"), py::arg("numel"), py::arg("dtype"),
        py::arg("num_threads"), py::arg("nontemporal") = false,
        "Bandwidth probe: x += read for each read-write stream x (1 to 4), on the optimizer's "
        "thread split; moves exactly the bytes of a step with the same streams. nontemporal: write "
        "x with streaming stores (the scalar variant has plain stores only).");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("scalar"), py::arg("numel"),
        py::arg("num_threads"), "STREAM triad a = b + scalar * c over fp32 arrays.");
  py::class_<StepPlan>(m, "StepPlan", "Cached pointer tables of one param group; see Note [cached step plans].")
      .def("collect", &StepPlan::collect, py::arg("params"), py::arg("state"),
           "0: cache valid and grads read; 1: stale (rebuild); 2: a grad needs the general path. Writes nothing.")
      .def("run_adam", &StepPlan::run_adam, py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
           py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("store") = int(kStorePlain),
           py::arg("seed") = 0, py::arg("grad_mul") = 1.0)
      .def("run_sgd", &StepPlan::run_sgd, py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"),
           py::arg("dampening"), py::arg("nesterov"), py::arg("maximize"), py::arg("num_threads"), py::kw_only(),
           py::arg("state_dtype") = -1, py::arg("store") = int(kStorePlain), py::arg("seed") = 0,
           py::arg("grad_mul") = 1.0)
      .def("grad_ptrs", &StepPlan::grad_ptrs,
           "The grads' addresses read by a successful collect(), in plan order; the plan stays ready to run.")
      .def("clear_first", &StepPlan::clear_first, "Mark every momentum buffer as initialised.")
      .def("take_grad_ptrs", &StepPlan::take_grad_ptrs,
           "The grads' addresses read by a successful collect(), in plan order (for the CUDA backend).")
      .def("release", &StepPlan::release, "Drop the grad references taken by collect().")
      .def("__len__", &StepPlan::size);
  py::class_<StepPlanBuilder>(m, "StepPlanBuilder", "Builds a StepPlan one entry at a time.")
      .def(py::init<py::list, py::dict, std::vector<std::string>, bool>(), py::arg("params"), py::arg("state"),
           py::arg("keys"), py::arg("with_step"))
      .def("add", &StepPlanBuilder::add, py::arg("position"), py::arg("param"), py::arg("state_dict"),
           py::arg("dtype"), py::arg("numel"), py::arg("pptr"), py::arg("streams"), py::arg("step"), py::arg("first"),
           py::arg("tensor_id"), py::kw_only(), py::arg("step_dtype") = int(kFloat32),
           "One entry: the param at `position` among those with a grad; consecutive entries of one dtype form a "
           "bucket. step_dtype: the dtype code of its step counter (float32 or float64).")
      .def("build", &StepPlanBuilder::build, "The plan; the builder cannot be used afterwards.");
  m.def("backend_info", &backend_info, "What was compiled, the CPU features found and the ISA in use.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name); }, py::arg("name"),
        "Force a CPU variant: 'scalar', 'avx2', 'avx512' or 'avx512bf16'.");
  m.def("get_cpu_isa", [] { return std::string(cpu::active_kernels().isa); });
  m.def("set_threads_backend", [](const std::string& name) { cpu::set_threads_backend(name); }, py::arg("name"),
        "Runs the CPU kernels on torch's OpenMP team ('openmp'), on fusedoptim's own threads ('pool'), or on the "
        "first where an OpenMP runtime is loaded ('auto', the default).");
  m.def("threads_backend", &cpu::threads_backend, "The threads the CPU kernels run on now.");
  m.def("set_q8_passes", [](const std::string& name) { cpu::set_q8_passes(name); }, py::arg("name"),
        "How the CPU kernels arrange the passes over a block of 8-bit Adam states: 'overlap', 'separate' or "
        "'auto' (by variant and CPU, the default). The bits are the same either way.");
  m.def("q8_passes", &cpu::q8_passes, "The arrangement of 8-bit Adam passes the active CPU variant runs now.");

  def_cuda(m);
}
