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
#include "../common/precision.h"
#include "../common/update_math.h"
#include "../cpu/cpu_features.h"
#include "../cpu/dispatch.h"
#include "../cpu/thread_pool.h"
#include "parse.h"

#ifndef FUSEDOPTIM_HAVE_CUDA
#define FUSEDOPTIM_HAVE_CUDA 0
#endif

namespace py = pybind11;
using namespace fusedoptim;
using namespace fusedoptim::bind;

namespace {

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               py::handle max_exp_avg_sqs, py::handle steps, py::handle numels_obj, int32_t dtype,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               bool amsgrad, bool maximize, int num_threads, int32_t state_dtype, int store, py::handle extras,
               py::handle ids, uint64_t seed, double grad_mul) {
  const Options o = options(dtype, state_dtype, store, seed, grad_mul);
  AdamCall call = adam_call(lr, beta1, beta2, eps, weight_decay, decoupled);
  call.hyper.grad_mul = o.grad_mul;
  const int threads = resolve_threads(num_threads);
  AdamLists lists = adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels_obj, o, amsgrad,
                               extras, ids);
  // Every check has passed: from here on we write.
  py::gil_scoped_release release;
  count_host_steps(lists, lr, beta1, beta2, o);
  cpu::adam_step(lists.tensors, call.hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, call.wd_mode, amsgrad,
                 maximize, threads);
}

void sgd_step(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle first_step,
              py::handle numels_obj, int32_t dtype, double lr, double weight_decay, double momentum,
              double dampening, bool nesterov, bool maximize, int num_threads, int32_t state_dtype, int store,
              py::handle extras, py::handle steps, py::handle ids, uint64_t seed, double grad_mul) {
  const Options o = options(dtype, state_dtype, store, seed, grad_mul);
  SGDCall call = sgd_call(lr, weight_decay, momentum, dampening, nesterov);
  call.hyper.grad_mul = o.grad_mul;
  const int threads = resolve_threads(num_threads);
  SGDLists lists = sgd_lists(params, grads, momentum_buffers, first_step, numels_obj, o, momentum != 0.0, extras,
                             steps, ids);
  py::gil_scoped_release release;
  count_sgd_steps(lists, o);
  cpu::sgd_step(lists.tensors, call.hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, weight_decay != 0.0,
                call.momentum_mode, maximize, threads);
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

// Note [cached step plans]
// A Python step over thousands of small tensors would spend most of its time
// asking each tensor for its grad and its address. A StepPlan caches, for one
// param group, everything that does not change between steps: the params,
// their addresses, the state tensors and their addresses, grouped in buckets
// of one dtype. Each step, collect() checks in C that the cache still holds
// (same params in the same list, same addresses, same grads present, same
// state tensor objects) and reads the grads' addresses; run_*() then updates
// all buckets. collect() writes nothing, so a step can check every group
// before it touches any; any mismatch sends Python back to its full check.
class StepPlan {
 public:
  enum Status { kOk = 0, kStale = 1, kSlowGrad = 2 };

  StepPlan(py::list params, std::vector<bool> with_grad, py::list state_dicts, std::vector<std::string> keys,
           py::list expected, py::object state_obj, std::vector<int64_t> positions, std::vector<int32_t> bucket_dtype,
           std::vector<int64_t> bucket_size, std::vector<int64_t> numels, std::vector<uintptr_t> pptrs,
           std::vector<uintptr_t> stream_ptrs, std::vector<uintptr_t> step_ptrs, std::vector<bool> first,
           py::list dtypes, py::list shapes)
      : params_list_(params), with_grad_(std::move(with_grad)), keys_(std::move(keys)), state_obj_(state_obj),
        positions_(std::move(positions)), bucket_dtype_(std::move(bucket_dtype)), bucket_size_(std::move(bucket_size)),
        numels_(std::move(numels)), pptrs_(std::move(pptrs)), stream_ptrs_(std::move(stream_ptrs)),
        step_ptrs_(std::move(step_ptrs)), first_(first.begin(), first.end()) {
    const size_t n = positions_.size();
    if (size_t(PyList_GET_SIZE(params.ptr())) != with_grad_.size()) throw py::value_error("with_grad length");
    for (const py::handle& p : params) params_.push_back(py::reinterpret_borrow<py::object>(p));
    if (numels_.size() != n || pptrs_.size() != n || first_.size() != n) throw py::value_error("plan table lengths");
    if (stream_ptrs_.size() != n * keys_.size()) throw py::value_error("stream table length");
    if (!step_ptrs_.empty() && step_ptrs_.size() != n) throw py::value_error("step table length");
    if (size_t(py::len(state_dicts)) != n || size_t(py::len(expected)) != n * (keys_.size() + (step_ptrs_.empty() ? 0 : 1))) {
      throw py::value_error("state tables length");
    }
    for (const py::handle& d : state_dicts) state_dicts_.push_back(py::reinterpret_borrow<py::object>(d));
    for (const py::handle& e : expected) expected_.push_back(py::reinterpret_borrow<py::object>(e));
    if (size_t(py::len(dtypes)) != n) throw py::value_error("dtypes length");
    for (const py::handle& d : dtypes) dtypes_.push_back(py::reinterpret_borrow<py::object>(d));
    if (size_t(py::len(shapes)) != n) throw py::value_error("shapes length");
    for (const py::handle& d : shapes) {
      const py::tuple shape = py::reinterpret_borrow<py::tuple>(d);
      ndims_.push_back(int64_t(shape.size()));
    }
    // The whole optimizer.state as it is now: a key added, removed or given
    // a new dict (state.clear(), del state[p], state[p] = {}) is a change.
    if (!PyDict_Check(state_obj.ptr())) throw py::type_error("state must be a dict");
    PyObject *key, *value;
    Py_ssize_t it = 0;
    while (PyDict_Next(state_obj.ptr(), &it, &key, &value)) {
      state_items_.push_back(py::reinterpret_borrow<py::object>(key));
      state_items_.push_back(py::reinterpret_borrow<py::object>(value));
    }
    int64_t total = 0;
    for (int64_t b : bucket_size_) total += b;
    if (total != int64_t(n) || bucket_dtype_.size() != bucket_size_.size()) throw py::value_error("bucket sizes");
    for (int32_t d : bucket_dtype_) check_dtype(d);
    for (const auto& k : keys_) key_objs_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString(k.c_str())));
    if (!step_ptrs_.empty()) key_objs_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString("step")));
    grad_ptrs_.assign(n, 0);
  }

  // Checks the cache against the group and reads the grads' addresses.
  int collect(py::handle params, py::handle state_obj) {
    const int status = collect_impl(params, state_obj);
    if (status != kOk) release();
    return status;
  }

  int collect_impl(py::handle params, py::handle state_obj) {
    collected_ = false;
    if (!params.is(params_list_) || !state_obj.is(state_obj_)) return kStale;
    if (size_t(PyDict_Size(state_obj.ptr())) * 2 != state_items_.size()) return kStale;
    {
      PyObject *key, *value;
      Py_ssize_t it = 0;
      size_t j = 0;
      while (PyDict_Next(state_obj.ptr(), &it, &key, &value)) {
        if (key != state_items_[j].ptr() || value != state_items_[j + 1].ptr()) return kStale;
        j += 2;
      }
    }
    PyObject* list = params.ptr();
    const Py_ssize_t count = PyList_GET_SIZE(list);
    if (size_t(count) != params_.size()) return kStale;
    wg_params_.clear();
    wg_grads_.clear();
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* p = PyList_GET_ITEM(list, i);
      if (p != params_[size_t(i)].ptr()) return kStale;
      py::object g = py::reinterpret_steal<py::object>(PyObject_GetAttr(p, s_grad().ptr()));
      if (!g) throw py::error_already_set();
      const bool has = !g.is_none();
      if (has != with_grad_[size_t(i)]) return kStale;
      if (has) {
        wg_params_.push_back(p);
        wg_grads_.push_back(std::move(g));
      }
    }
    // Native entries. The param: same address, still contiguous, same size
    // in bytes (p.data = p.data.t() keeps the address). The grad: the
    // param's dtype, rank and size in bytes (g.data = ... can change any of
    // them), contiguous, then its address. (len(g), for the first dimension,
    // costs torch over a microsecond per tensor: a same-rank, same-size
    // reshape of a grad's .data is the one change left to the kernels, which
    // update element by element and read nothing beyond the grad.) Any doubt sends
    // Python to its full check. Nothing here allocates a tracked object (no
    // torch.Size): a step must not feed the garbage collector.
    size_t bucket = 0;
    int64_t bucket_end = bucket_size_.empty() ? 0 : bucket_size_[0];
    for (size_t k = 0; k < positions_.size(); ++k) {
      while (int64_t(k) >= bucket_end) bucket_end += bucket_size_[++bucket];
      const int64_t pos = positions_[k];
      if (pos < 0 || size_t(pos) >= wg_grads_.size()) return kStale;
      PyObject* p = wg_params_[size_t(pos)];
      PyObject* g = wg_grads_[size_t(pos)].ptr();
      const int64_t nbytes = numels_[k] * int64_t(dtype_size(bucket_dtype_[bucket]));
      if (call_ptr(p) != pptrs_[k] || !call_bool(p, s_is_contiguous().ptr()) || get_int(p, s_nbytes()) != nbytes) {
        return kStale;
      }
      if (!attr_is(g, s_dtype(), dtypes_[k].ptr()) || get_int(g, s_nbytes()) != nbytes) return kStale;
      if (get_int(g, s_ndim()) != ndims_[k]) return kStale;
      if (!call_bool(g, s_is_contiguous().ptr())) return kSlowGrad;
      grad_ptrs_[k] = call_ptr(g);
    }
    // State: the same tensor objects under the same keys.
    const size_t nk = key_objs_.size();
    for (size_t k = 0; k < positions_.size(); ++k) {
      PyObject* d = state_dicts_[k].ptr();
      if (!PyDict_Check(d)) return kStale;
      for (size_t j = 0; j < nk; ++j) {
        PyObject* v = PyDict_GetItemWithError(d, key_objs_[j].ptr());
        if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (v != expected_[k * nk + j].ptr()) return kStale;
      }
    }
    collected_ = true;
    return kOk;
  }

  void run_adam(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                bool maximize, int num_threads, int32_t state_dtype, int store, uint64_t seed, double grad_mul) {
    take_collected();
    const size_t nk = keys_.size();
    const bool extra = store == kStoreMaster || store == kStoreKahan;
    if (nk != (amsgrad ? 3u : 2u) + (extra ? 1u : 0u) || step_ptrs_.empty()) {
      throw py::value_error("plan was built for other Adam flags");
    }
    if (store == kStoreStochastic && ids_.size() != positions_.size()) throw py::value_error("plan has no tensor ids");
    AdamCall call = adam_call(lr, beta1, beta2, eps, weight_decay, decoupled);
    const int threads = resolve_threads(num_threads);
    // Every bucket's options are checked before the first step counter moves.
    std::vector<Options> opts;
    for (int32_t d : bucket_dtype_) opts.push_back(options(d, state_dtype, store, seed, grad_mul));
    call.hyper.grad_mul = opts.empty() ? 1.0f : opts[0].grad_mul;
    {
    py::gil_scoped_release release;
    cpu::AdamCoeffCache coeff_cache(lr, beta1, beta2);
    size_t k0 = 0;
    for (size_t b = 0; b < bucket_size_.size(); ++b) {
      const size_t n = size_t(bucket_size_[b]);
      const Options& o = opts[b];
      std::vector<AdamTensor> ts(n);
      for (size_t j = 0; j < n; ++j) {
        const size_t k = k0 + j;
        float* step = reinterpret_cast<float*>(step_ptrs_[k]);
        *step += 1.0f;
        ts[j].param = reinterpret_cast<void*>(pptrs_[k]);
        ts[j].grad = reinterpret_cast<const void*>(grad_ptrs_[k]);
        ts[j].exp_avg = reinterpret_cast<void*>(stream_ptrs_[k * nk + 0]);
        ts[j].exp_avg_sq = reinterpret_cast<void*>(stream_ptrs_[k * nk + 1]);
        ts[j].max_exp_avg_sq = amsgrad ? reinterpret_cast<void*>(stream_ptrs_[k * nk + 2]) : nullptr;
        ts[j].extra = extra ? reinterpret_cast<void*>(stream_ptrs_[k * nk + nk - 1]) : nullptr;
        ts[j].numel = numels_[k];
        ts[j].coeffs = coeff_cache.get(*step);
        if (store == kStoreStochastic) ts[j].sr_key = sr_key(seed, uint32_t(*step), ids_[k]);
      }
      cpu::adam_step(ts, call.hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, call.wd_mode, amsgrad, maximize,
                     threads);
      k0 += n;
    }
    }
    release();
  }

  void run_sgd(double lr, double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
               int num_threads, int32_t state_dtype, int store, uint64_t seed, double grad_mul) {
    take_collected();
    const bool use_momentum = momentum != 0.0;
    const bool extra = store == kStoreMaster || store == kStoreKahan;
    const size_t nk = keys_.size();
    if (nk != (use_momentum ? 1u : 0u) + (extra ? 1u : 0u)) throw py::value_error("plan was built for other SGD flags");
    if (store == kStoreStochastic && (ids_.size() != positions_.size() || step_ptrs_.size() != positions_.size())) {
      throw py::value_error("plan has no tensor ids or step counters");
    }
    SGDCall call = sgd_call(lr, weight_decay, momentum, dampening, nesterov);
    const int threads = resolve_threads(num_threads);
    std::vector<Options> opts;
    for (int32_t d : bucket_dtype_) opts.push_back(options(d, state_dtype, store, seed, grad_mul));
    call.hyper.grad_mul = opts.empty() ? 1.0f : opts[0].grad_mul;
    {
    py::gil_scoped_release release;
    size_t k0 = 0;
    for (size_t b = 0; b < bucket_size_.size(); ++b) {
      const size_t n = size_t(bucket_size_[b]);
      const Options& o = opts[b];
      std::vector<SGDTensor> ts(n);
      for (size_t j = 0; j < n; ++j) {
        const size_t k = k0 + j;
        ts[j].param = reinterpret_cast<void*>(pptrs_[k]);
        ts[j].grad = reinterpret_cast<const void*>(grad_ptrs_[k]);
        ts[j].momentum_buffer = use_momentum ? reinterpret_cast<void*>(stream_ptrs_[k * nk]) : nullptr;
        ts[j].extra = extra ? reinterpret_cast<void*>(stream_ptrs_[k * nk + nk - 1]) : nullptr;
        ts[j].numel = numels_[k];
        ts[j].first_step = use_momentum && first_[k] != 0;
        if (store == kStoreStochastic) {
          float* step = reinterpret_cast<float*>(step_ptrs_[k]);
          *step += 1.0f;
          ts[j].sr_key = sr_key(seed, uint32_t(*step), ids_[k]);
        }
      }
      cpu::sgd_step(ts, call.hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, weight_decay != 0.0,
                    call.momentum_mode, maximize, threads);
      k0 += n;
    }
    }
    std::fill(first_.begin(), first_.end(), char(0));
    release();
  }

  // Stochastic rounding: each entry's tensor id (its position in the optimizer).
  void set_ids(std::vector<uint32_t> ids) {
    if (ids.size() != positions_.size()) throw py::value_error("set_ids: one id per entry");
    ids_ = std::move(ids);
  }

  // The grads' addresses read by a successful collect(), in plan order,
  // leaving the plan ready to run (for the grad norm of max_grad_norm).
  py::list grad_ptrs() const {
    if (!collected_) throw py::value_error("StepPlan.grad_ptrs needs a successful collect() first");
    py::list out(grad_ptrs_.size());
    for (size_t k = 0; k < grad_ptrs_.size(); ++k) {
      PyObject* v = PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(grad_ptrs_[k]));
      if (v == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(out.ptr(), Py_ssize_t(k), v);
    }
    return out;
  }

  // After a step that ran through the general path.
  void clear_first() { std::fill(first_.begin(), first_.end(), char(0)); }

  // The grads' addresses read by collect(), in plan order, for a backend
  // that runs outside this plan (the CUDA kernels). Drops the references
  // collect() took, like run_*: the caller's grads stay alive through the
  // params until the step returns.
  py::list take_grad_ptrs() {
    take_collected();
    py::list out(grad_ptrs_.size());
    for (size_t k = 0; k < grad_ptrs_.size(); ++k) {
      PyObject* v = PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(grad_ptrs_[k]));
      if (v == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(out.ptr(), Py_ssize_t(k), v);
    }
    release();
    return out;
  }

  // Drops the references collect() took (the grads), keeping the cache.
  void release() {
    wg_grads_.clear();
    wg_params_.clear();
    collected_ = false;
  }

  size_t size() const { return positions_.size(); }

 private:
  static const py::object& s_grad() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("grad")); return s; }
  static const py::object& s_data_ptr() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("data_ptr")); return s; }
  static const py::object& s_nbytes() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("nbytes")); return s; }
  static const py::object& s_ndim() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("ndim")); return s; }
  static const py::object& s_dtype() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("dtype")); return s; }
  static const py::object& s_is_contiguous() { static const py::object s = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("is_contiguous")); return s; }

  static uintptr_t call_ptr(PyObject* t) {
    PyObject* args[1] = {t};
    PyObject* r = PyObject_VectorcallMethod(s_data_ptr().ptr(), args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    if (r == nullptr) throw py::error_already_set();
    const unsigned long long v = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
    return uintptr_t(v);
  }
  static bool call_bool(PyObject* t, PyObject* name) {
    PyObject* args[1] = {t};
    PyObject* r = PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    if (r == nullptr) throw py::error_already_set();
    const int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (v < 0) throw py::error_already_set();
    return v == 1;
  }
  static bool attr_is(PyObject* t, const py::object& attr, PyObject* expected) {
    PyObject* r = PyObject_GetAttr(t, attr.ptr());
    if (r == nullptr) throw py::error_already_set();
    const bool same = r == expected;
    Py_DECREF(r);
    return same;
  }
  static int64_t get_int(PyObject* t, const py::object& attr) {
    PyObject* r = PyObject_GetAttr(t, attr.ptr());
    if (r == nullptr) throw py::error_already_set();
    const long long v = PyLong_AsLongLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    return v;
  }

  void take_collected() {
    if (!collected_) throw py::value_error("StepPlan.run_* needs a successful collect() first");
    collected_ = false;
  }

  py::object params_list_;
  std::vector<py::object> params_;
  std::vector<bool> with_grad_;
  std::vector<std::string> keys_;
  std::vector<py::object> key_objs_;
  py::object state_obj_;
  std::vector<py::object> state_dicts_;
  std::vector<py::object> expected_;
  std::vector<py::object> dtypes_;       // per native entry: the param's torch.dtype
  std::vector<int64_t> ndims_;           // per native entry: the param's rank
  std::vector<py::object> state_items_;  // optimizer.state's keys and values, flattened
  std::vector<int64_t> positions_;  // per native entry: index among params with grad
  std::vector<int32_t> bucket_dtype_;
  std::vector<int64_t> bucket_size_;
  std::vector<int64_t> numels_;
  std::vector<uintptr_t> pptrs_;
  std::vector<uintptr_t> stream_ptrs_;  // entry-major: [k * keys + j]
  std::vector<uintptr_t> step_ptrs_;
  std::vector<char> first_;
  std::vector<uintptr_t> grad_ptrs_;
  std::vector<uint32_t> ids_;             // stochastic rounding: tensor ids
  std::vector<PyObject*> wg_params_;      // params with a grad, this step (borrowed: params_ owns them)
  std::vector<py::object> wg_grads_;      // their grads, held until the next collect()
  bool collected_ = false;
};

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
  info["cuda_compiled"] = bool(FUSEDOPTIM_HAVE_CUDA);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedoptim native kernels (private; use the fusedoptim package)";
  m.attr("DTYPE_FLOAT32") = int(kFloat32);
  m.attr("DTYPE_BFLOAT16") = int(kBFloat16);
  m.attr("DTYPE_FLOAT16") = int(kFloat16);

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
        py::arg("grad_mul") = 1.0,
        "Fused Adam/AdamW update of many tensors in one call. Pointers are data addresses; "
        "steps point at float32 step counters, incremented in place before use. The keyword "
        "arguments select the precision options of Note [precision options]: the states' dtype "
        "code (-1: the params'), the store mode, its extra stream per tensor (fp32 master or "
        "Kahan compensation), the tensor ids and seed of stochastic rounding, and the factor "
        "(clip coefficient) the grads are multiplied by.");
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("first_step"), py::arg("numels"), py::arg("dtype"), py::arg("lr"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1,
        py::arg("store") = int(kStorePlain), py::arg("extras") = py::none(), py::arg("steps") = py::none(),
        py::arg("tensor_ids") = py::none(), py::arg("seed") = 0, py::arg("grad_mul") = 1.0,
        "Fused SGD update of many tensors in one call. first_step[k] marks a momentum buffer "
        "that this call initialises with the gradient. Keyword arguments as for adam_step; "
        "stochastic rounding also takes float32 step counters (incremented in place).");
  m.def("grad_norm_sq", &grad_norm_sq, py::arg("grads"), py::arg("numels"), py::arg("dtypes"),
        py::arg("num_threads"),
        "Sum of squares of all grad elements in double, in a fixed order (deterministic for any "
        "thread count and CPU variant).");
  m.def("clip_coef", [](double sumsq, double max_norm) {
          if (!(max_norm > 0.0) || !std::isfinite(max_norm)) throw py::value_error("max_norm must be positive and finite");
          float norm = 0.0f;
          const float coef = clip_coef(sumsq, float(max_norm), &norm);
          return py::make_tuple(norm, coef);
        }, py::arg("sumsq"), py::arg("max_norm"),
        "(total_norm, coefficient) of clip_grad_norm_ from a sum of squares, in fp32 as torch computes them.");
  m.def("stream_probe", &stream_probe, py::arg("rw"), py::arg("read"), py::arg("numel"), py::arg("dtype"),
        py::arg("num_threads"),
        "Bandwidth probe: x += read for each read-write stream x (1 to 4), on the optimizer's "
        "thread split; moves exactly the bytes of a step with the same streams.");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("scalar"), py::arg("numel"),
        py::arg("num_threads"), "STREAM triad a = b + scalar * c over fp32 arrays.");
  py::class_<StepPlan>(m, "StepPlan", "Cached pointer tables of one param group; see Note [cached step plans].")
      .def(py::init<py::list, std::vector<bool>, py::list, std::vector<std::string>, py::list, py::object,
                    std::vector<int64_t>, std::vector<int32_t>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<uintptr_t>, std::vector<uintptr_t>, std::vector<uintptr_t>, std::vector<bool>,
                    py::list, py::list>(),
           py::arg("params"), py::arg("with_grad"), py::arg("state_dicts"), py::arg("keys"), py::arg("expected"),
           py::arg("state_obj"), py::arg("positions"), py::arg("bucket_dtype"), py::arg("bucket_size"),
           py::arg("numels"), py::arg("pptrs"), py::arg("stream_ptrs"), py::arg("step_ptrs"), py::arg("first"),
           py::arg("dtypes"), py::arg("shapes"))
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
      .def("set_ids", &StepPlan::set_ids, py::arg("ids"), "Stochastic rounding: the entries' tensor ids.")
      .def("grad_ptrs", &StepPlan::grad_ptrs,
           "The grads' addresses read by a successful collect(), in plan order; the plan stays ready to run.")
      .def("clear_first", &StepPlan::clear_first, "Mark every momentum buffer as initialised.")
      .def("take_grad_ptrs", &StepPlan::take_grad_ptrs,
           "The grads' addresses read by a successful collect(), in plan order (for the CUDA backend).")
      .def("release", &StepPlan::release, "Drop the grad references taken by collect().")
      .def("__len__", &StepPlan::size);
  m.def("backend_info", &backend_info, "What was compiled, the CPU features found and the ISA in use.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name); }, py::arg("name"),
        "Force a CPU variant: 'scalar', 'avx2' or 'avx512'.");
  m.def("get_cpu_isa", [] { return std::string(cpu::active_kernels().isa); });

  def_cuda(m);
}
