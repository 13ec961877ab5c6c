// Parsing and checking of the binding layer's arguments, shared by the CPU
// entry points (module.cpp, step_plan.cpp) and the CUDA ones (cuda.cpp):
// lists of addresses, counts, dtype and layout codes, pointers, alignment and
// lengths, the checks that keep the kernels inside their memory. Everything
// here throws a Python exception before anything is written.
// Hyperparameter domains (betas in [0, 1), Nesterov's conditions...) are the
// Python layer's to check; the scalars themselves come from common/coeffs.h.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "../common/coeffs.h"
#include "../common/layouts.h"
#include "../common/macros.h"
#include "../common/params.h"
#include "../common/quant8.h"

namespace fusedoptim {
namespace bind {

namespace py = pybind11;

// A Python int -> an address, or the Python error. An address takes two of
// CPython's 30-bit digits, which its unsigned long reader converts in a
// loop; the unsigned long long one goes through a generic byte-array
// conversion, several times slower (5-6% of a cached plan's check).
inline uintptr_t address_of(PyObject* obj) {
#if ULONG_MAX >= UINTPTR_MAX
  const unsigned long v = PyLong_AsUnsignedLong(obj);
#else
  const unsigned long long v = PyLong_AsUnsignedLongLong(obj);
#endif
  if (v == static_cast<decltype(v)>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return uintptr_t(v);
}

// Python list of ints -> addresses. Much cheaper than the generic caster for
// the thousands of pointers a large model passes on every step.
inline std::vector<uintptr_t> addresses(const py::handle& obj, const char* what, size_t expect) {
  if (!PyList_Check(obj.ptr())) throw py::type_error(std::string(what) + " must be a list of ints");
  const Py_ssize_t n = PyList_GET_SIZE(obj.ptr());
  if (size_t(n) != expect) {
    throw py::value_error(std::string(what) + " has " + std::to_string(n) + " entries, expected " + std::to_string(expect));
  }
  std::vector<uintptr_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[size_t(i)] = address_of(PyList_GET_ITEM(obj.ptr(), i));
  return out;
}

inline std::vector<int64_t> counts(const py::handle& obj) {
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

inline void check_dtype(int32_t dtype) {
  if (!dtype_known(dtype)) throw py::value_error("unsupported dtype code " + std::to_string(dtype));
}

inline void check_ptr(uintptr_t p, int64_t numel, size_t align, const char* what, size_t k) {
  if (numel == 0) return;
  if (p == 0) throw py::value_error(std::string(what) + "[" + std::to_string(k) + "] is a null pointer");
  if (p % align != 0) throw py::value_error(std::string(what) + "[" + std::to_string(k) + "] is misaligned for its dtype");
}

inline int resolve_threads(int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be at least 1");
  return num_threads;
}

// Precision options of a call (Note [precision options] in
// common/precision.h), checked: which storage the states use, how the
// param is stored (a layout of common/layouts.h) and the stochastic-rounding seed.
struct Options {
  int32_t dtype = kFloat32;        // params and grads
  int32_t state_dtype = kFloat32;  // exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer
  int store = kStorePlain;
  uint64_t seed = 0;
};

inline Options options(int32_t dtype, int32_t state_dtype, int store, uint64_t seed) {
  check_dtype(dtype);
  Options o;
  o.dtype = dtype;
  o.state_dtype = state_dtype < 0 ? dtype : state_dtype;
  if (o.state_dtype != kQuant8) check_dtype(o.state_dtype);
  o.store = store;
  if (!layout_supported(o.dtype, o.state_dtype, store)) {
    throw py::value_error(std::string("unsupported combination: ") + dtype_name(o.dtype) + " params, " +
                          dtype_name(o.state_dtype) + " states, store mode " + std::to_string(store));
  }
  o.seed = seed;
  return o;
}

// The extra stream of each tensor (fp32 master or Kahan compensation), or
// nothing for the other store modes.
inline std::vector<uintptr_t> extra_streams(py::handle extras, const Options& o, const std::vector<int64_t>& numels) {
  const size_t n = numels.size();
  const bool needed = o.store == kStoreMaster || o.store == kStoreKahan;
  if (!needed) {
    if (!extras.is_none()) throw py::value_error("extras are only taken with store mode master or kahan");
    return {};
  }
  if (extras.is_none()) throw py::value_error("store mode master/kahan needs extras (one stream per tensor)");
  const auto x = addresses(extras, "extras", n);
  const size_t align = o.store == kStoreMaster ? sizeof(float) : dtype_size(o.dtype);
  for (size_t k = 0; k < n; ++k) check_ptr(x[k], numels[k], align, "extras", k);
  return x;
}

// Tensor ids of stochastic rounding: part of each tensor's random key.
inline std::vector<uint32_t> tensor_ids(py::handle ids, const Options& o, size_t n) {
  if (o.store != kStoreStochastic) return {};
  if (ids.is_none()) throw py::value_error("stochastic rounding needs tensor_ids (one per tensor)");
  const auto v = addresses(ids, "tensor_ids", n);
  std::vector<uint32_t> out(n);
  for (size_t k = 0; k < n; ++k) {
    if (v[k] > 0xffffffffu) throw py::value_error("tensor_ids must fit in 32 bits");
    out[k] = uint32_t(v[k]);
  }
  return out;
}

// The tensor lists of an Adam call, parsed and checked; nothing written yet.
// The fp32 scales of 8-bit states (Note [8-bit states]): one list per
// moment, one address per tensor, each of q8_blocks(numel, block) floats.
inline std::vector<float*> q8_scales(py::handle obj, const char* what, const Options& o,
                                     const std::vector<int64_t>& numels, int64_t block) {
  const size_t n = numels.size();
  if (o.state_dtype != kQuant8) {
    if (!obj.is_none()) throw py::value_error(std::string(what) + " are only taken with 8-bit states");
    return {};
  }
  if (!q8_block_ok(block)) {
    throw py::value_error("8-bit states need block_size, a power of two from 64 to 4096, got " + std::to_string(block));
  }
  if (obj.is_none()) throw py::value_error(std::string("8-bit states need ") + what + " (one list entry per tensor)");
  const auto a = addresses(obj, what, n);
  std::vector<float*> out(n);
  for (size_t k = 0; k < n; ++k) {
    check_ptr(a[k], q8_blocks(numels[k], block), alignof(float), what, k);
    out[k] = reinterpret_cast<float*>(a[k]);
  }
  return out;
}

struct AdamLists {
  std::vector<AdamTensor> tensors;  // coeffs and sr_key unset until StepCounter::count_all()
  std::vector<StepRef> steps;       // step counters (float32, or all float64), one per tensor
  std::vector<uint32_t> ids;        // stochastic rounding: tensor ids
};

inline AdamLists adam_lists(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
                            py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj, const Options& o,
                            bool amsgrad, py::handle extras = py::none(), py::handle ids = py::none(),
                            int32_t step_dtype = kFloat32, py::handle m_scales = py::none(),
                            py::handle v_scales = py::none(), int64_t block = 0) {
  if (step_dtype != kFloat32 && step_dtype != kFloat64) {
    throw py::value_error("step_dtype must be the code of float32 or float64, got " + std::to_string(step_dtype));
  }
  const bool f64 = step_dtype == kFloat64;
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
  const auto x = extra_streams(extras, o, numels);
  if (o.state_dtype == kQuant8 && amsgrad) throw py::value_error("8-bit states do not take amsgrad=True");
  const auto ms = q8_scales(m_scales, "exp_avg_scales", o, numels, block);
  const auto vs = q8_scales(v_scales, "exp_avg_sq_scales", o, numels, block);
  AdamLists out;
  out.ids = tensor_ids(ids, o, n);
  const size_t align = dtype_size(o.dtype);
  const size_t salign = dtype_size(o.state_dtype);
  for (size_t k = 0; k < n; ++k) {
    check_ptr(p[k], numels[k], align, "params", k);
    check_ptr(g[k], numels[k], align, "grads", k);
    check_ptr(m[k], numels[k], salign, "exp_avgs", k);
    check_ptr(v[k], numels[k], salign, "exp_avg_sqs", k);
    if (amsgrad) check_ptr(vmax[k], numels[k], salign, "max_exp_avg_sqs", k);
    check_ptr(s[k], 1, f64 ? alignof(double) : alignof(float), "steps", k);
  }
  out.tensors.resize(n);
  out.steps.resize(n);
  for (size_t k = 0; k < n; ++k) {
    AdamTensor& t = out.tensors[k];
    t.param = reinterpret_cast<void*>(p[k]);
    t.grad = reinterpret_cast<const void*>(g[k]);
    t.exp_avg = reinterpret_cast<void*>(m[k]);
    t.exp_avg_sq = reinterpret_cast<void*>(v[k]);
    t.max_exp_avg_sq = amsgrad ? reinterpret_cast<void*>(vmax[k]) : nullptr;
    t.extra = x.empty() ? nullptr : reinterpret_cast<void*>(x[k]);
    t.exp_avg_scale = ms.empty() ? nullptr : ms[k];
    t.exp_avg_sq_scale = vs.empty() ? nullptr : vs[k];
    t.numel = numels[k];
    t.coeffs = AdamCoeffs{0.0f, 0.0f};
    out.steps[k] = StepRef{reinterpret_cast<void*>(s[k]), f64};
  }
  return out;
}

// The tensor lists of an SGD call, parsed and checked; nothing written yet.
// With stochastic rounding, `steps` are float32 step counters (SGD keeps
// none in torch) that give the random keys.
struct SGDLists {
  std::vector<SGDTensor> tensors;
  std::vector<StepRef> steps;  // float32
  std::vector<uint32_t> ids;
};

inline SGDLists sgd_lists(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
                          py::handle numels_obj, const Options& o, bool use_momentum,
                          py::handle extras = py::none(), py::handle steps = py::none(),
                          py::handle ids = py::none(), py::handle b_scales = py::none(), int64_t block = 0) {
  const std::vector<int64_t> numels = counts(numels_obj);
  const size_t n = numels.size();
  const auto p = addresses(params, "params", n);
  const auto g = addresses(grads, "grads", n);
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
  const auto x = extra_streams(extras, o, numels);
  // Without momentum there is nothing to quantize: no scales either.
  const auto bs = use_momentum ? q8_scales(b_scales, "momentum_scales", o, numels, block) : std::vector<float*>{};
  SGDLists out;
  out.ids = tensor_ids(ids, o, n);
  std::vector<uintptr_t> s;
  if (o.store == kStoreStochastic) {
    if (steps.is_none()) throw py::value_error("stochastic rounding needs steps (one counter per tensor)");
    s = addresses(steps, "steps", n);
  } else if (!steps.is_none()) {
    throw py::value_error("SGD takes steps only with stochastic rounding");
  }
  const size_t align = dtype_size(o.dtype);
  for (size_t k = 0; k < n; ++k) {
    check_ptr(p[k], numels[k], align, "params", k);
    check_ptr(g[k], numels[k], align, "grads", k);
    if (use_momentum) check_ptr(b[k], numels[k], dtype_size(o.state_dtype), "momentum_buffers", k);
    if (!s.empty()) check_ptr(s[k], 1, alignof(float), "steps", k);
  }
  out.tensors.resize(n);
  for (size_t k = 0; k < n; ++k) {
    SGDTensor& t = out.tensors[k];
    t.param = reinterpret_cast<void*>(p[k]);
    t.grad = reinterpret_cast<const void*>(g[k]);
    t.momentum_buffer = use_momentum ? reinterpret_cast<void*>(b[k]) : nullptr;
    t.momentum_scale = bs.empty() ? nullptr : bs[k];
    t.extra = x.empty() ? nullptr : reinterpret_cast<void*>(x[k]);
    t.numel = numels[k];
    t.first_step = first[k] != 0;
    if (!s.empty()) out.steps.push_back(StepRef{reinterpret_cast<void*>(s[k]), false});
  }
  return out;
}

}  // namespace bind
}  // namespace fusedoptim
