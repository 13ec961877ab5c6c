// Cached step plans of param groups (Note [cached step plans]) and the
// builder that fills one entry at a time.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/params.h"
#include "parse.h"

namespace fusedoptim {
namespace bind {

// Note [cached step plans]
// A Python step over thousands of small tensors would spend most of its time
// asking each tensor for its grad and its address. A StepPlan caches, for one
// param group, everything that does not change between steps: the params,
// their addresses, the state tensors and their addresses, grouped in buckets
// of one dtype. Each step, collect() checks in C that the cache still holds
// (same params in the same list, same addresses, dtypes and shapes, the same
// grads present with their params' dtypes and shapes, same state tensor
// objects) and reads the grads' addresses; run_*() then updates all buckets. collect() writes nothing, so a step can check every group
// before it touches any; any mismatch sends Python back to its full check.
// A StepPlanBuilder makes one: an entry per param that the plan updates,
// added in kernel order (StepPlanBuilder::add).
//
// (Hidden visibility, as pybind11's own types that the classes hold.)
class __attribute__((visibility("hidden"))) StepPlan {
 public:
  enum Status { kOk = 0, kStale = 1, kSlowGrad = 2 };

  // Checks the cache against the group and reads the grads' addresses.
  int collect(py::handle params, py::handle state_obj);
  void run_adam(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                bool maximize, int num_threads, int32_t state_dtype, int store, uint64_t seed, double grad_mul);
  void run_sgd(double lr, double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
               int num_threads, int32_t state_dtype, int store, uint64_t seed, double grad_mul);
  // The grads' addresses read by a successful collect(), in plan order,
  // leaving the plan ready to run (for the grad norm of max_grad_norm).
  py::list grad_ptrs() const;
  // After a step that ran through the general path.
  void clear_first();
  // The grads' addresses read by collect(), in plan order, for a backend
  // that runs outside this plan (the CUDA kernels). Drops the references
  // collect() took, like run_*: the caller's grads stay alive through the
  // params until the step returns.
  py::list take_grad_ptrs();
  // Drops the references collect() took (the grads), keeping the cache.
  void release();
  size_t size() const { return positions_.size(); }

 private:
  friend class StepPlanBuilder;

  int collect_impl(py::handle params, py::handle state_obj);
  void take_collected();
  std::vector<Options> bucket_options(int32_t state_dtype, int store, uint64_t seed) const;
  template <class Tensor, class Fill, class Run>
  void run_buckets(const std::vector<Options>& opts, Fill&& fill, Run&& run);

  py::object params_list_;
  std::vector<py::object> params_;
  std::vector<bool> with_grad_;
  std::vector<std::string> keys_;
  std::vector<py::object> key_objs_;     // keys_, then "step" when with_step_
  bool with_step_ = false;
  py::object state_obj_;
  std::vector<py::object> state_items_;  // optimizer.state's keys and values, flattened
  // Per entry (param the plan updates), in kernel order:
  std::vector<py::object> state_dicts_;
  std::vector<py::object> expected_;     // entry-major: [k * key_objs_ + j]
  std::vector<uintptr_t> expected_ptrs_;  // their data addresses (0 for None), as expected_
  std::vector<int64_t> expected_nbytes_;  // their sizes in bytes, as expected_
  std::vector<py::object> dtypes_;       // the param's torch.dtype
  std::vector<py::object> shapes_;       // the param's torch.Size
  std::vector<int64_t> positions_;       // index among params with grad
  std::vector<int64_t> numels_;
  std::vector<uintptr_t> pptrs_;
  std::vector<uintptr_t> stream_ptrs_;   // entry-major: [k * keys_ + j]
  std::vector<uintptr_t> step_ptrs_;     // with_step_ only
  std::vector<char> step_f64_;           // with_step_ only: a float64 counter (else float32)
  std::vector<char> first_;
  std::vector<uint32_t> ids_;            // stochastic rounding: tensor ids
  std::vector<uintptr_t> grad_ptrs_;
  // Buckets: runs of consecutive entries of one dtype.
  std::vector<int32_t> bucket_dtype_;
  std::vector<int64_t> bucket_size_;
  // Set by collect():
  std::vector<PyObject*> wg_params_;     // params with a grad, this step (borrowed: params_ owns them)
  std::vector<py::object> wg_grads_;     // their grads, held until the next collect()
  bool collected_ = false;
};

class __attribute__((visibility("hidden"))) StepPlanBuilder {
 public:
  // params: the group's list (collect() checks its identity); state:
  // optimizer.state; keys: the state streams in kernel order; with_step:
  // entries also track state_dict["step"], a step counter (float32, or
  // float64 as torch keeps it under a float64 default dtype; see add()).
  StepPlanBuilder(py::list params, py::dict state, std::vector<std::string> keys, bool with_step);
  // One entry: position among the group's params that have a grad, the
  // param and its state dict, dtype code, element count, the param's
  // address, one address per key, the step counter's address (0 without
  // with_step), whether this step initialises the SGD momentum buffer, and
  // the stochastic-rounding tensor id. Consecutive entries of one dtype
  // form a bucket.
  void add(int64_t position, py::handle param, py::handle state_dict, int32_t dtype, int64_t numel, uintptr_t pptr,
           const std::vector<uintptr_t>& streams, uintptr_t step, bool first, uint32_t tensor_id,
           int32_t step_dtype = kFloat32);
  StepPlan build();

 private:
  void check_open() const;

  StepPlan plan_;
  bool built_ = false;
};

}  // namespace bind
}  // namespace fusedoptim
