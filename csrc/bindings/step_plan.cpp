#include "step_plan.h"

#include <algorithm>
#include <utility>

#include "../common/coeffs.h"
#include "../cpu/dispatch.h"

namespace fusedoptim {
namespace bind {

namespace {

py::object intern(const char* s) { return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(s)); }

// Note [direct tensor reads]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// collect() reads about a dozen attributes per param each step, and a read
// through PyObject_GetAttr or a method call first looks the name up along
// the type's MRO: about a fifth of its cost. For the exact types torch.Tensor
// and torch.nn.Parameter, whose attributes these are torch._C.TensorBase's
// own (checked once, below), the reads call TensorBase's descriptors
// directly: the same C functions with the same arguments, minus the lookup.
// Any other type (a subclass may override anything) takes the generic path.
enum Attr { kGrad, kNbytes, kDtype, kShape, kNumAttrs };
enum Method { kDataPtr, kIsContiguous, kNumMethods };
constexpr const char* kAttrNames[kNumAttrs] = {"grad", "nbytes", "dtype", "shape"};
constexpr const char* kMethodNames[kNumMethods] = {"data_ptr", "is_contiguous"};

struct Reads {
  py::object attr_names[kNumAttrs], method_names[kNumMethods], step = intern("step");
  PyObject* attrs[kNumAttrs] = {};      // TensorBase's getset descriptors
  PyObject* methods[kNumMethods] = {};  // TensorBase's method descriptors
  PyTypeObject* direct[2] = {};         // the types read directly (none if a check failed)

  Reads() {
    for (int a = 0; a < kNumAttrs; ++a) attr_names[a] = intern(kAttrNames[a]);
    for (int m = 0; m < kNumMethods; ++m) method_names[m] = intern(kMethodNames[m]);
    try {
      py::module_ torch = py::module_::import("torch");
      py::object c = torch.attr("_C");
      py::object base = py::hasattr(c, "TensorBase") ? c.attr("TensorBase") : c.attr("_TensorBase");
      py::object dict = base.attr("__dict__");
      py::object types[2] = {torch.attr("Tensor"), torch.attr("nn").attr("Parameter")};
      // A descriptor is used only where both types resolve the name to it.
      const auto own = [&](const py::object& name, PyTypeObject* kind) -> PyObject* {
        if (!dict.contains(name)) return nullptr;
        py::object d = dict[name];
        if (Py_TYPE(d.ptr()) != kind) return nullptr;
        for (const py::object& t : types) {
          if (!py::getattr(t, name).is(d)) return nullptr;
        }
        return d.release().ptr();  // kept for the life of the process
      };
      for (int a = 0; a < kNumAttrs; ++a) {
        if ((attrs[a] = own(attr_names[a], &PyGetSetDescr_Type)) == nullptr) return;
      }
      for (int m = 0; m < kNumMethods; ++m) {
        if ((methods[m] = own(method_names[m], &PyMethodDescr_Type)) == nullptr) return;
      }
      for (int k = 0; k < 2; ++k) direct[k] = reinterpret_cast<PyTypeObject*>(types[k].ptr());
    } catch (const py::error_already_set&) {
      // No direct reads: every read takes the generic path.
    }
  }

  bool is_direct(PyObject* t) const {
    const PyTypeObject* ty = Py_TYPE(t);
    return ty == direct[0] || (ty == direct[1] && ty != nullptr);
  }
  // t.<attr>, a new reference (nullptr with the Python error set).
  PyObject* get(PyObject* t, Attr a) const {
    if (is_direct(t)) {
      PyObject* d = attrs[a];
      return Py_TYPE(d)->tp_descr_get(d, t, reinterpret_cast<PyObject*>(Py_TYPE(t)));
    }
    return PyObject_GetAttr(t, attr_names[a].ptr());
  }
  // t.<method>(), a new reference (nullptr with the Python error set).
  PyObject* call(PyObject* t, Method m) const {
    if (is_direct(t)) return PyObject_Vectorcall(methods[m], &t, 1, nullptr);
    PyObject* args[1] = {t};
    return PyObject_VectorcallMethod(method_names[m].ptr(), args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
  }
};

// Made on first use, when torch is imported (never freed: the names must
// outlive the interpreter's teardown).
const Reads& reads() {
  static const Reads* r = new Reads();
  return *r;
}

py::object get_attr(PyObject* t, Attr a) {
  PyObject* r = reads().get(t, a);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

uintptr_t call_ptr(PyObject* t) {
  py::object r = py::reinterpret_steal<py::object>(reads().call(t, kDataPtr));
  if (!r) throw py::error_already_set();
  return address_of(r.ptr());
}

bool is_contiguous(PyObject* t) {
  PyObject* r = reads().call(t, kIsContiguous);
  if (r == nullptr) throw py::error_already_set();
  const int v = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (v < 0) throw py::error_already_set();
  return v == 1;
}

bool attr_is(PyObject* t, Attr a, PyObject* expected) { return get_attr(t, a).ptr() == expected; }

// Whether t.shape equals the expected torch.Size. The Size torch makes is
// freed before this returns, so the garbage collector's count is unchanged.
bool same_shape(PyObject* t, const py::object& expected) {
  py::object r = get_attr(t, kShape);
  const int v = PyObject_RichCompareBool(r.ptr(), expected.ptr(), Py_EQ);
  if (v < 0) throw py::error_already_set();
  return v == 1;
}

int64_t get_int(PyObject* t, Attr a) {
  py::object r = get_attr(t, a);
  const long long v = PyLong_AsLongLong(r.ptr());
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

py::list int_list(const std::vector<uintptr_t>& v) {
  py::list out(v.size());
  for (size_t k = 0; k < v.size(); ++k) {
    PyObject* x = PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(v[k]));
    if (x == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), Py_ssize_t(k), x);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// StepPlanBuilder

StepPlanBuilder::StepPlanBuilder(py::list params, py::dict state, std::vector<std::string> keys, bool with_step) {
  StepPlan& p = plan_;
  p.params_list_ = params;
  for (const py::handle& q : params) {
    p.params_.push_back(py::reinterpret_borrow<py::object>(q));
    py::object g = get_attr(q.ptr(), kGrad);
    p.with_grad_.push_back(!g.is_none());
  }
  p.state_obj_ = state;
  p.keys_ = std::move(keys);
  for (const auto& k : p.keys_) p.key_objs_.push_back(intern(k.c_str()));
  p.with_step_ = with_step;
  if (with_step) p.key_objs_.push_back(reads().step);
}

void StepPlanBuilder::check_open() const {
  if (built_) throw py::value_error("StepPlanBuilder: build() was called already");
}

void StepPlanBuilder::add(int64_t position, py::handle param, py::handle state_dict, int32_t dtype, int64_t numel,
                          uintptr_t pptr, const std::vector<uintptr_t>& streams, uintptr_t step, bool first,
                          uint32_t tensor_id, int32_t step_dtype) {
  check_open();
  StepPlan& p = plan_;
  const size_t k = p.positions_.size();
  check_dtype(dtype);
  if (position < 0) throw py::value_error("StepPlanBuilder.add: position must be non-negative");
  if (numel < 0) throw py::value_error("StepPlanBuilder.add: numel must be non-negative");
  if (streams.size() != p.keys_.size()) {
    throw py::value_error("StepPlanBuilder.add: " + std::to_string(streams.size()) + " streams, expected one per key (" +
                          std::to_string(p.keys_.size()) + ")");
  }
  check_ptr(pptr, numel, dtype_size(dtype), "pptr", k);
  if (step_dtype != kFloat32 && step_dtype != kFloat64) {
    throw py::value_error("StepPlanBuilder.add: step_dtype must be the code of float32 or float64");
  }
  if (p.with_step_) {
    check_ptr(step, 1, step_dtype == kFloat64 ? alignof(double) : alignof(float), "step", k);
  } else if (step != 0) {
    throw py::value_error("StepPlanBuilder.add: a step counter for a plan built without with_step");
  }
  if (!PyDict_Check(state_dict.ptr())) throw py::type_error("StepPlanBuilder.add: state_dict must be a dict");
  if (p.bucket_dtype_.empty() || p.bucket_dtype_.back() != dtype) {
    if (std::find(p.bucket_dtype_.begin(), p.bucket_dtype_.end(), dtype) != p.bucket_dtype_.end()) {
      throw py::value_error(std::string("StepPlanBuilder.add: ") + dtype_name(dtype) +
                            " entries must be consecutive (one bucket per dtype)");
    }
    p.bucket_dtype_.push_back(dtype);
    p.bucket_size_.push_back(0);
  }
  p.bucket_size_.back() += 1;
  // The state objects collect() expects: state_dict.get(key), None if absent,
  // with the address the kernels are given (which must be the object's own)
  // and the object's size in bytes.
  for (size_t j = 0; j < p.key_objs_.size(); ++j) {
    PyObject* v = PyDict_GetItemWithError(state_dict.ptr(), p.key_objs_[j].ptr());
    if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    const uintptr_t given = j < streams.size() ? streams[j] : step;
    if (v != nullptr && v != Py_None && call_ptr(v) != given) {
      throw py::value_error("StepPlanBuilder.add: the address of state['" + (j < p.keys_.size() ? p.keys_[j] : std::string("step")) +
                            "'] of entry " + std::to_string(k) + " is not the state tensor's own");
    }
    const bool tensor = v != nullptr && v != Py_None;
    p.expected_.push_back(tensor ? py::reinterpret_borrow<py::object>(v) : py::none());
    p.expected_ptrs_.push_back(tensor ? given : 0);
    p.expected_nbytes_.push_back(tensor ? get_int(v, kNbytes) : 0);
  }
  p.state_dicts_.push_back(py::reinterpret_borrow<py::object>(state_dict));
  p.dtypes_.push_back(param.attr("dtype"));
  p.shapes_.push_back(param.attr("shape"));
  p.positions_.push_back(position);
  p.numels_.push_back(numel);
  p.pptrs_.push_back(pptr);
  p.stream_ptrs_.insert(p.stream_ptrs_.end(), streams.begin(), streams.end());
  if (p.with_step_) {
    p.step_ptrs_.push_back(step);
    p.step_f64_.push_back(char(step_dtype == kFloat64));
  }
  p.first_.push_back(char(first));
  p.ids_.push_back(tensor_id);
}

StepPlan StepPlanBuilder::build() {
  check_open();
  built_ = true;
  StepPlan& p = plan_;
  // The whole optimizer.state as it is now: a key added, removed or given
  // a new dict (state.clear(), del state[p], state[p] = {}) is a change.
  PyObject *key, *value;
  Py_ssize_t it = 0;
  while (PyDict_Next(p.state_obj_.ptr(), &it, &key, &value)) {
    p.state_items_.push_back(py::reinterpret_borrow<py::object>(key));
    p.state_items_.push_back(py::reinterpret_borrow<py::object>(value));
  }
  p.grad_ptrs_.assign(p.positions_.size(), 0);
  return std::move(plan_);
}

// ---------------------------------------------------------------------------
// StepPlan

int StepPlan::collect(py::handle params, py::handle state_obj) {
  const int status = collect_impl(params, state_obj);
  if (status != kOk) release();
  return status;
}

int StepPlan::collect_impl(py::handle params, py::handle state_obj) {
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
    py::object g = get_attr(p, kGrad);
    const bool has = !g.is_none();
    if (has != with_grad_[size_t(i)]) return kStale;
    if (has) {
      wg_params_.push_back(p);
      wg_grads_.push_back(std::move(g));
    }
  }
  // Native entries. The param: same address, still contiguous, same size
  // in bytes (p.data = p.data.t() keeps the address). The grad: the
  // param's dtype and shape (g.data = ... can change either, a reshape of
  // the same size included, for which torch raises), contiguous, then its
  // address. Dtype and shape imply the size in bytes, and one read of the
  // shape costs about what reads of the rank and the size did. Any doubt
  // sends Python to its full check.
  size_t bucket = 0;
  int64_t bucket_end = bucket_size_.empty() ? 0 : bucket_size_[0];
  for (size_t k = 0; k < positions_.size(); ++k) {
    while (int64_t(k) >= bucket_end) bucket_end += bucket_size_[++bucket];
    const int64_t pos = positions_[k];
    if (pos < 0 || size_t(pos) >= wg_grads_.size()) return kStale;
    PyObject* p = wg_params_[size_t(pos)];
    PyObject* g = wg_grads_[size_t(pos)].ptr();
    const int64_t nbytes = numels_[k] * int64_t(dtype_size(bucket_dtype_[bucket]));
    if (call_ptr(p) != pptrs_[k] || !is_contiguous(p) || get_int(p, kNbytes) != nbytes) {
      return kStale;
    }
    if (!attr_is(g, kDtype, dtypes_[k].ptr()) || !same_shape(g, shapes_[k])) return kStale;
    if (!is_contiguous(g)) return kSlowGrad;
    grad_ptrs_[k] = call_ptr(g);
  }
  // State: the same tensor objects under the same keys, each still at the
  // address the kernels write and of the same size in bytes (resize_,
  // set_ or .data = ... keep the object and move or shrink its memory).
  const size_t nk = key_objs_.size();
  for (size_t k = 0; k < positions_.size(); ++k) {
    PyObject* d = state_dicts_[k].ptr();
    if (!PyDict_Check(d)) return kStale;
    for (size_t j = 0; j < nk; ++j) {
      const size_t e = k * nk + j;
      PyObject* v = PyDict_GetItemWithError(d, key_objs_[j].ptr());
      if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if ((v == nullptr ? Py_None : v) != expected_[e].ptr()) return kStale;  // absent is None, as in add()
      if (expected_ptrs_[e] != 0 && (call_ptr(v) != expected_ptrs_[e] || get_int(v, kNbytes) != expected_nbytes_[e])) {
        return kStale;
      }
    }
  }
  collected_ = true;
  return kOk;
}

void StepPlan::take_collected() {
  if (!collected_) throw py::value_error("StepPlan.run_* needs a successful collect() first");
  collected_ = false;
}

// Every bucket's options are checked before the first step counter moves.
std::vector<Options> StepPlan::bucket_options(int32_t state_dtype, int store, uint64_t seed) const {
  std::vector<Options> opts;
  // 8-bit states need their scales, which a plan does not keep: such groups take the general path.
  if (state_dtype == kQuant8) throw py::value_error("a cached plan does not run 8-bit states");
  for (int32_t d : bucket_dtype_) opts.push_back(options(d, state_dtype, store, seed));
  return opts;
}

// For each bucket: fill(k, tensor) for its entries k, then run(tensors,
// options), without the GIL.
template <class Tensor, class Fill, class Run>
void StepPlan::run_buckets(const std::vector<Options>& opts, Fill&& fill, Run&& run) {
  py::gil_scoped_release release;
  size_t k0 = 0;
  for (size_t b = 0; b < bucket_size_.size(); ++b) {
    const size_t n = size_t(bucket_size_[b]);
    std::vector<Tensor> ts(n);
    for (size_t j = 0; j < n; ++j) fill(k0 + j, ts[j]);
    run(ts, opts[b]);
    k0 += n;
  }
}

void StepPlan::run_adam(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                        bool amsgrad, bool maximize, int num_threads, int32_t state_dtype, int store, uint64_t seed,
                        double grad_mul) {
  take_collected();
  const size_t nk = keys_.size();
  const bool extra = store == kStoreMaster || store == kStoreKahan;
  if (nk != (amsgrad ? 3u : 2u) + (extra ? 1u : 0u) || !with_step_) {
    throw py::value_error("plan was built for other Adam flags");
  }
  const int threads = resolve_threads(num_threads);
  const std::vector<Options> opts = bucket_options(state_dtype, store, seed);
  AdamHyper hyper = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled);
  hyper.grad_mul = float(grad_mul);
  const int wd_mode = adam_wd_mode(weight_decay, decoupled);
  StepCounter counter(lr, beta1, beta2, store, seed);
  run_buckets<AdamTensor>(
      opts,
      [&](size_t k, AdamTensor& t) {
        t.param = reinterpret_cast<void*>(pptrs_[k]);
        t.grad = reinterpret_cast<const void*>(grad_ptrs_[k]);
        t.exp_avg = reinterpret_cast<void*>(stream_ptrs_[k * nk + 0]);
        t.exp_avg_sq = reinterpret_cast<void*>(stream_ptrs_[k * nk + 1]);
        t.max_exp_avg_sq = amsgrad ? reinterpret_cast<void*>(stream_ptrs_[k * nk + 2]) : nullptr;
        t.extra = extra ? reinterpret_cast<void*>(stream_ptrs_[k * nk + nk - 1]) : nullptr;
        t.numel = numels_[k];
        counter.count(StepRef{reinterpret_cast<void*>(step_ptrs_[k]), step_f64_[k] != 0}, ids_[k], t);
      },
      [&](const std::vector<AdamTensor>& ts, const Options& o) {
        cpu::adam_step(ts, hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, wd_mode, amsgrad, maximize, threads);
      });
  release();
}

void StepPlan::run_sgd(double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                       bool maximize, int num_threads, int32_t state_dtype, int store, uint64_t seed,
                       double grad_mul) {
  take_collected();
  const bool use_momentum = momentum != 0.0;
  const bool extra = store == kStoreMaster || store == kStoreKahan;
  const size_t nk = keys_.size();
  if (nk != (use_momentum ? 1u : 0u) + (extra ? 1u : 0u)) throw py::value_error("plan was built for other SGD flags");
  if (store == kStoreStochastic && !with_step_) throw py::value_error("plan has no step counters");
  const int threads = resolve_threads(num_threads);
  const std::vector<Options> opts = bucket_options(state_dtype, store, seed);
  SGDHyper hyper = sgd_hyper(lr, weight_decay, momentum, dampening);
  hyper.grad_mul = float(grad_mul);
  const int mode = sgd_momentum_mode(momentum, nesterov);
  StepCounter counter(store, seed);
  run_buckets<SGDTensor>(
      opts,
      [&](size_t k, SGDTensor& t) {
        t.param = reinterpret_cast<void*>(pptrs_[k]);
        t.grad = reinterpret_cast<const void*>(grad_ptrs_[k]);
        t.momentum_buffer = use_momentum ? reinterpret_cast<void*>(stream_ptrs_[k * nk]) : nullptr;
        t.extra = extra ? reinterpret_cast<void*>(stream_ptrs_[k * nk + nk - 1]) : nullptr;
        t.numel = numels_[k];
        t.first_step = use_momentum && first_[k] != 0;
        if (with_step_) counter.count(StepRef{reinterpret_cast<void*>(step_ptrs_[k]), step_f64_[k] != 0}, ids_[k], t);
      },
      [&](const std::vector<SGDTensor>& ts, const Options& o) {
        cpu::sgd_step(ts, hyper, cpu::Layout{o.dtype, o.state_dtype, o.store}, weight_decay != 0.0, mode, maximize,
                      threads);
      });
  std::fill(first_.begin(), first_.end(), char(0));
  release();
}

py::list StepPlan::grad_ptrs() const {
  if (!collected_) throw py::value_error("StepPlan.grad_ptrs needs a successful collect() first");
  return int_list(grad_ptrs_);
}

void StepPlan::clear_first() { std::fill(first_.begin(), first_.end(), char(0)); }

py::list StepPlan::take_grad_ptrs() {
  take_collected();
  py::list out = int_list(grad_ptrs_);
  release();
  return out;
}

void StepPlan::release() {
  wg_grads_.clear();
  wg_params_.clear();
  collected_ = false;
}

}  // namespace bind
}  // namespace fusedoptim
