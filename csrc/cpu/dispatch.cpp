#include "dispatch.h"

#include "../common/precision.h"
#include "../common/quant8.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"
#include "thread_pool.h"

namespace fusedoptim {
namespace cpu {

#if !FUSEDOPTIM_HAVE_AVX2
const KernelTable* kernels_avx2() { return nullptr; }
#endif
#if !FUSEDOPTIM_HAVE_AVX512
const KernelTable* kernels_avx512() { return nullptr; }
#endif
#if !FUSEDOPTIM_HAVE_AVX512BF16
const KernelTable* kernels_avx512bf16() { return nullptr; }
#endif

namespace {

struct Variant {
  const char* name;
  const KernelTable* (*table)();
  bool (*runnable)();
};

bool always() { return true; }

// Best first.
const Variant kVariants[] = {
    {"avx512bf16", &kernels_avx512bf16, &can_run_avx512bf16},
    {"avx512", &kernels_avx512, &can_run_avx512},
    {"avx2", &kernels_avx2, &can_run_avx2},
    {"scalar", &kernels_scalar, &always},
};

// Variant names match in any case ("AVX2" is "avx2"); nothing else is trimmed.
std::string ascii_lower(std::string s) {
  for (char& c : s) c = (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c;
  return s;
}

const KernelTable* find(const std::string& requested, bool* runnable) {
  const std::string name = ascii_lower(requested);
  for (const Variant& v : kVariants) {
    if (name == v.name) {
      *runnable = v.runnable();
      return v.table();
    }
  }
  *runnable = false;
  return nullptr;
}

const KernelTable* best() {
  for (const Variant& v : kVariants) {
    if (v.table() != nullptr && v.runnable()) return v.table();
  }
  return kernels_scalar();
}

const KernelTable* initial() {
  const char* env = std::getenv("FUSEDOPTIM_CPU_ISA");
  if (env == nullptr || *env == '\0') return best();
  bool runnable;
  const KernelTable* t = find(env, &runnable);
  // An unusable request must not crash the import; Python reports it
  // (backend_info()['isa_request']) and we keep the best variant.
  return (t != nullptr && runnable) ? t : best();
}

std::atomic<const KernelTable*> g_active{initial()};

// Note [8-bit passes] in kernels.cpp: -1 auto, 0 separate, 1 overlap.
int parse_q8_passes(const std::string& requested) {
  const std::string name = ascii_lower(requested);
  if (name == "auto" || name.empty()) return -1;
  if (name == "separate") return 0;
  if (name == "overlap") return 1;
  throw std::invalid_argument("unknown 8-bit passes '" + requested + "' (expected auto, overlap or separate)");
}

int initial_q8_passes() {
  const char* env = std::getenv("FUSEDOPTIM_Q8_PASSES");
  if (env == nullptr) return -1;
  try {
    return parse_q8_passes(env);
  } catch (const std::invalid_argument&) {
    return -1;  // Python warns about the value
  }
}

std::atomic<int> g_q8_passes{initial_q8_passes()};

bool q8_overlap(const KernelTable& kt) {
  if (kt.vector_width == 1) return false;  // the scalar variant has one arrangement
  const int forced = g_q8_passes.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  // AVX2 lanes on AMD (Zen 3) ran faster in separate passes; AVX2 lanes on
  // Intel and AVX-512 lanes (Sapphire Rapids) overlapped.
  return !(kt.vector_width == 8 && cpu_features().amd);
}

// Below this many elements per thread, waking a thread costs more than it
// saves. On torch's OpenMP team (Note [threads]), 2^14: one tensor of 2^15
// elements with 2 threads on a 2-core Xeon, in the loop mode of the sweep,
// went from 0.89-0.92x to 0.91-0.96x torch fused's step for SGD and from
// 1.14-1.16x to 1.21-1.25x for AdamW when it took the second thread (three
// rounds in turns); 2^13 (two threads from 2^14 elements) showed no clear
// gain over it in two rounds.
constexpr int64_t kMinElemsPerThread = 1 << 14;
// Chunk boundaries fall on multiples of this many elements of each tensor:
// 256 B of fp32, 128 B of bf16/fp16, so whole cache lines of each stream.
constexpr int64_t kChunkAlign = 64;
// Threads claim chunks of this many elements (Note [threads]): small enough
// that a thread the OS has descheduled holds up little, large enough that
// each stream of a chunk is a long run for the hardware prefetcher.
constexpr int64_t kMinChunk = 1 << 12;
constexpr int64_t kMaxChunk = 1 << 16;

// Many small tensors are separate allocations, and the hardware prefetcher
// starts over at each one: while a tensor is updated, ask for the first
// cache lines of every stream of the next one.
inline void prefetch_head(const void* p, size_t esize, int64_t numel) {
  const char* c = static_cast<const char*>(p);
  const int64_t bytes = std::min<int64_t>(numel * int64_t(esize), 512);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

// Runs fn(tensor_index, begin, end) over all tensors, split across threads.
// Every begin is a multiple of `align` elements of its tensor (a multiple of
// kChunkAlign: the block size of 8-bit states, whose blocks one thread updates).
template <class Fn>
void run_flat(const std::vector<int64_t>& numels, int num_threads, Fn&& fn, int64_t align = kChunkAlign) {
  const size_t n = numels.size();
  std::vector<int64_t> start(n + 1, 0);  // padded prefix sums
  for (size_t k = 0; k < n; ++k) {
    start[k + 1] = start[k] + (numels[k] + align - 1) / align * align;
  }
  const int64_t total = start[n];
  if (total == 0) return;
  const int64_t threads =
      std::min<int64_t>(std::max(num_threads, 1), (total + kMinElemsPerThread - 1) / kMinElemsPerThread);
  if (threads <= 1) {
    for (size_t k = 0; k < n; ++k) {
      if (numels[k] > 0) fn(k, 0, numels[k]);
    }
    return;
  }
  // About eight chunks a thread, so the split evens out when one is late.
  int64_t chunk = std::min(kMaxChunk, std::max(kMinChunk, total / (threads * 8)));
  chunk = (chunk + align - 1) / align * align;
  const int64_t chunks = (total + chunk - 1) / chunk;
  parallel_chunks(int(threads), chunks, [&](int64_t c) {
    const int64_t lo = c * chunk;
    const int64_t hi = std::min(total, lo + chunk);
    size_t k = size_t(std::upper_bound(start.begin(), start.end(), lo) - start.begin()) - 1;
    for (; k < n && start[k] < hi; ++k) {
      const int64_t b = std::max(lo, start[k]) - start[k];
      const int64_t e = std::min(std::min(hi, start[k + 1]) - start[k], numels[k]);
      if (b < e) fn(k, b, e);
    }
  });
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const Variant& v : kVariants) {
    if (v.table() != nullptr) out.push_back(v.name);
  }
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Variant& v : kVariants) {
    if (v.table() != nullptr && v.runnable()) out.push_back(v.name);
  }
  return out;
}

const KernelTable& active_kernels() { return *g_active.load(); }

void set_isa(const std::string& name) {
  bool runnable;
  const KernelTable* t = find(name, &runnable);
  if (t == nullptr) {
    bool known = false;
    for (const Variant& v : kVariants) known |= (ascii_lower(name) == v.name);
    if (!known) throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected scalar, avx2 or avx512)");
    throw std::runtime_error("CPU ISA '" + name + "' was not compiled into this build of fusedoptim");
  }
  if (!runnable) throw std::runtime_error("CPU ISA '" + name + "' is not supported by this CPU or OS");
  g_active.store(t);
}

namespace {

// The element sizes of a layout's streams, for prefetching.
struct StreamSizes {
  size_t param, state, extra;
  explicit StreamSizes(const Layout& l)
      : param(dtype_size(l.dtype)), state(dtype_size(l.state_dtype)),
        extra(l.store == kStoreMaster ? sizeof(float) : param) {}
};

void prefetch_tensor(const AdamTensor& n, const StreamSizes& z) {
  prefetch_head(n.param, z.param, n.numel);
  prefetch_head(n.grad, z.param, n.numel);
  prefetch_head(n.exp_avg, z.state, n.numel);
  prefetch_head(n.exp_avg_sq, z.state, n.numel);
  if (n.max_exp_avg_sq != nullptr) prefetch_head(n.max_exp_avg_sq, z.state, n.numel);
  if (n.extra != nullptr) prefetch_head(n.extra, z.extra, n.numel);
}

void prefetch_tensor(const SGDTensor& n, const StreamSizes& z) {
  prefetch_head(n.param, z.param, n.numel);
  prefetch_head(n.grad, z.param, n.numel);
  if (n.momentum_buffer != nullptr) prefetch_head(n.momentum_buffer, z.state, n.numel);
  if (n.extra != nullptr) prefetch_head(n.extra, z.extra, n.numel);
}

// Runs update(tensor, begin, end) over every tensor of a fused call,
// prefetching the head of the next tensor.
template <class Tensor, class Update>
void run_tensors(const std::vector<Tensor>& tensors, const Layout& layout, int num_threads, int64_t q8_block,
                 Update&& update) {
  std::vector<int64_t> numels(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) numels[k] = tensors[k].numel;
  const StreamSizes sizes(layout);
  int64_t align = kChunkAlign;
  if (layout.state_dtype == kQuant8) {
    if (!q8_block_ok(q8_block)) throw std::invalid_argument("8-bit states need a block size that is a power of two from 64 to 4096");
    align = q8_block;
  }
  run_flat(
      numels, num_threads,
      [&](size_t k, int64_t b, int64_t e) {
        if (k + 1 < tensors.size()) prefetch_tensor(tensors[k + 1], sizes);
        update(tensors[k], b, e);
      },
      align);
}

}  // namespace

void adam_step(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper, const Layout& layout,
               int wd_mode, bool amsgrad, bool maximize, int num_threads) {
  const KernelTable& kt = *g_active.load();
  const AdamSegmentFn fn = kt.adam(layout, wd_mode, amsgrad, maximize);
  if (fn == nullptr) throw std::invalid_argument("adam_step: unsupported layout or weight-decay mode");
  AdamHyper h = hyper;
  h.q8_overlap = q8_overlap(kt);
  run_tensors(tensors, layout, num_threads, h.q8_block, [&](const AdamTensor& t, int64_t b, int64_t e) { fn(t, b, e, h); });
}

void sgd_step(const std::vector<SGDTensor>& tensors, const SGDHyper& hyper, const Layout& layout,
              bool weight_decay, int momentum_mode, bool maximize, int num_threads) {
  const SGDSegmentFn steady = g_active.load()->sgd(layout, weight_decay, momentum_mode, maximize, false);
  const SGDSegmentFn first = g_active.load()->sgd(layout, weight_decay, momentum_mode, maximize, true);
  if (steady == nullptr || first == nullptr) throw std::invalid_argument("sgd_step: unsupported layout or momentum mode");
  run_tensors(tensors, layout, num_threads, hyper.q8_block,
              [&](const SGDTensor& t, int64_t b, int64_t e) { (t.first_step ? first : steady)(t, b, e, hyper); });
}

void set_q8_passes(const std::string& name) { g_q8_passes.store(parse_q8_passes(name)); }

std::string q8_passes() {
  const std::string chosen = q8_overlap(*g_active.load()) ? "overlap" : "separate";
  return g_q8_passes.load() < 0 ? chosen + " (auto)" : chosen;
}

double grad_norm_sq(const std::vector<NormTensor>& grads, int num_threads) {
  const KernelTable& kt = *g_active.load();
  // Chunk j of the whole list: tensor chunk_tensor[j], elements from chunk_begin[j].
  std::vector<size_t> chunk_tensor;
  std::vector<int64_t> chunk_begin;
  std::vector<NormChunkFn> fns(grads.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    fns[k] = kt.norm(grads[k].dtype);
    if (fns[k] == nullptr) throw std::invalid_argument("grad_norm_sq: unsupported dtype");
    for (int64_t b = 0; b < grads[k].numel; b += kNormChunk) {
      chunk_tensor.push_back(k);
      chunk_begin.push_back(b);
    }
  }
  const int64_t nchunks = int64_t(chunk_tensor.size());
  std::vector<double> sums(size_t(nchunks), 0.0);
  // A chunk's sum never depends on which thread computes it.
  const int64_t threads = std::min<int64_t>(std::max(num_threads, 1), std::max<int64_t>(1, nchunks / 8));
  parallel_chunks(int(threads), nchunks, [&](int64_t j) {
    const NormTensor& t = grads[chunk_tensor[size_t(j)]];
    const int64_t b = chunk_begin[size_t(j)];
    sums[size_t(j)] = fns[chunk_tensor[size_t(j)]](t.grad, b, std::min(b + kNormChunk, t.numel));
  });
  // Chunk sums in order: within a tensor, then across tensors.
  double total = 0.0;
  size_t j = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    double tsum = 0.0;
    for (; j < chunk_tensor.size() && chunk_tensor[j] == k; ++j) tsum += sums[j];
    total += tsum;
  }
  return total;
}

void probe_streams(const std::vector<void*>& rw, const void* r, int64_t numel, int32_t dtype, int num_threads,
                   bool nontemporal) {
  const ProbeSegmentFn fn = g_active.load()->probe(dtype, int(rw.size()), nontemporal);
  if (fn == nullptr) throw std::invalid_argument("stream_probe: 1 to 4 read-write streams of a supported dtype");
  run_flat({numel}, num_threads, [&](size_t, int64_t b, int64_t e) { fn(rw.data(), r, b, e); });
}

void triad(float* a, const float* b, const float* c, float s, int64_t numel, int num_threads) {
  const TriadSegmentFn fn = g_active.load()->triad;
  run_flat({numel}, num_threads, [&](size_t, int64_t lo, int64_t hi) { fn(a, b, c, s, lo, hi); });
}

}  // namespace cpu
}  // namespace fusedoptim
