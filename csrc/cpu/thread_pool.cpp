// Threads for the CPU kernels: torch's OpenMP team where one is loaded, else
// a pool of our own (Note [threads] in thread_pool.h).
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <dlfcn.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <link.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FO_HAVE_MXCSR 1
#endif

namespace fusedoptim {
namespace cpu {
namespace {

// Every thread takes the caller's floating-point environment for the job
// (flush-to-zero and denormals-are-zero, as torch.set_flush_denormal sets
// them), so the thread count never changes a result; torch's workers get
// their own back afterwards.
unsigned fp_mode() {
#if FO_HAVE_MXCSR
  return _mm_getcsr();
#else
  return 0;
#endif
}

void set_fp_mode(unsigned mode) {
#if FO_HAVE_MXCSR
  _mm_setcsr(mode);
#else
  (void)mode;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int current_pid() {
#if defined(_WIN32)
  return 0;
#else
  return int(getpid());
#endif
}

// ---------------------------------------------------------------------------
// torch's OpenMP team

using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

using OmpThreadNumFn = int (*)();

struct OpenMP {
  GompParallelFn parallel = nullptr;
  OmpThreadNumFn thread_num = nullptr;  // omp_get_thread_num of the same runtime
  std::string path;
};

#if defined(__linux__)
int find_openmp_library(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const std::string s(name);
  const size_t slash = s.rfind('/');
  const std::string base = slash == std::string::npos ? s : s.substr(slash + 1);
  for (const char* lib : {"libgomp", "libiomp5", "libomp"}) {
    if (base.compare(0, std::char_traits<char>::length(lib), lib) == 0) {
      static_cast<std::vector<std::string>*>(out)->push_back(s);
      break;
    }
  }
  return 0;
}
#endif

// The first OpenMP runtime loaded into the process, in load order: torch's,
// since fusedoptim imports torch before its compiled module.
OpenMP find_openmp() {
  OpenMP omp;
#if !defined(_WIN32)
  void* sym = nullptr;
#if defined(__linux__)
  std::vector<std::string> libs;
  dl_iterate_phdr(&find_openmp_library, &libs);
  for (const std::string& lib : libs) {
    // RTLD_NOLOAD: only a library already loaded; the handle is never closed.
    void* handle = dlopen(lib.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr) continue;
    sym = dlsym(handle, "GOMP_parallel");
    if (sym != nullptr) break;
  }
#endif
  if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "GOMP_parallel");
  if (sym != nullptr) {
    omp.parallel = reinterpret_cast<GompParallelFn>(sym);
    Dl_info info;
    omp.path = (dladdr(sym, &info) != 0 && info.dli_fname != nullptr) ? info.dli_fname : "?";
    // From the library that holds GOMP_parallel, never another runtime's.
    void* handle = omp.path == "?" ? nullptr : dlopen(omp.path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    void* num = handle == nullptr ? nullptr : dlsym(handle, "omp_get_thread_num");
    omp.thread_num = reinterpret_cast<OmpThreadNumFn>(num);
  }
#endif
  return omp;
}

const OpenMP& openmp() {
  static const OpenMP omp = find_openmp();
  return omp;
}

// Note [home chunks]
// ~~~~~~~~~~~~~~~~~~
// Thread t of the team first runs the chunks of its home range, the t-th of
// `team` equal runs of chunks in order, then claims what is left of the
// others' ranges (one chunk at a time, from each range's cursor). So an
// unhindered team splits a step as a static split would, and the same
// thread updates the same elements at every step: a cache-sized tensor's
// part stays in that core's L2 from one step to the next, where claiming
// from one shared counter dealt the chunks to whichever thread came first
// and moved lines between cores each step. A late thread still holds up
// nothing: its range is claimed by the others. (SGD momentum, fp32, 2^16
// elements, 2 threads on a 2-core Xeon: 0.9x torch fused's step with one
// shared counter; torch's own split is static.) Which thread runs a chunk
// never changes its bits.
constexpr int kMaxHomeRanges = 64;

struct alignas(64) HomeRange {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

struct OmpJob {
  const std::function<void(int64_t)>* fn;
  int64_t num_chunks;
  unsigned mode;
  std::thread::id caller;
  OmpThreadNumFn thread_num = nullptr;
  int team = 0;                       // home ranges (0: one shared counter)
  HomeRange* ranges = nullptr;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> by_others{0};  // chunks the team's other threads ran
  double caller_seconds = 0.0;        // the caller's time in the region
};

using Clock = std::chrono::steady_clock;

void omp_body(void* data) {
  OmpJob& job = *static_cast<OmpJob*>(data);
  const bool caller = std::this_thread::get_id() == job.caller;
  const auto t0 = caller ? Clock::now() : Clock::time_point();
  const unsigned saved = fp_mode();
  if (saved != job.mode) set_fp_mode(job.mode);
  int64_t mine = 0;
  const int me = job.team > 0 ? job.thread_num() : -1;
  if (me >= 0 && me < job.team) {  // Note [home chunks]
    for (int k = 0; k < job.team; ++k) {
      HomeRange& r = job.ranges[(me + k) % job.team];
      for (int64_t c; (c = r.next.fetch_add(1, std::memory_order_relaxed)) < r.end; ++mine) (*job.fn)(c);
    }
  } else {
    for (int64_t c; (c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.num_chunks; ++mine) (*job.fn)(c);
  }
  if (saved != job.mode) set_fp_mode(saved);
  if (caller) {
    job.caller_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  } else if (mine > 0) {
    job.by_others.fetch_add(mine, std::memory_order_relaxed);
  }
}

// Note [late workers]
// ~~~~~~~~~~~~~~~~~~~
// An OpenMP region ends at a barrier that waits for every thread of the team.
// When another process holds a core, the team's thread there may not run for
// a whole scheduler time slice (milliseconds), and the region waits for it
// although the caller has claimed and run every chunk; or a thread of the
// team is descheduled in the middle of a chunk. Such a region is easy to see
// afterwards: the caller waited at the barrier for more than kLateShare of
// the time it worked, plus 100 us, so the region took more than 1.5 times
// the caller's own work in it (with chunks claimed one at a time, an
// unhindered team ends within a chunk of each other). A late region that
// wasted W seconds buys a period in which every call runs on the calling
// thread alone, until those calls have run for factor * W seconds; the
// factor doubles at each late region (from kMinSolo up to kMaxSolo) and
// halves at each region the team turns up for. The period is counted in the
// solo calls' own time, not the clock's: in a training loop most of the
// time between steps is torch's work, and a period of wall time would end
// before the next step began, so that every step's first region would wait
// again. So the time lost to waiting stays at most about 1/kMinSolo of the
// kernels' time that follows it, and where no region is late nothing
// changes. The bits are the same either way.
constexpr double kLateShare = 0.5;
constexpr double kMinSolo = 16.0;
constexpr double kMaxSolo = 256.0;
std::atomic<int64_t> g_solo_left{0};  // ns of solo calls left in the period
std::atomic<double> g_solo_factor{kMinSolo};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

void run_openmp(const OpenMP& omp, int n, int64_t num_chunks, const std::function<void(int64_t)>& fn) {
  OmpJob job;
  job.fn = &fn;
  job.num_chunks = num_chunks;
  job.mode = fp_mode();
  job.caller = std::this_thread::get_id();
  HomeRange ranges[kMaxHomeRanges];
  if (omp.thread_num != nullptr && n <= kMaxHomeRanges) {
    job.thread_num = omp.thread_num;
    job.team = n;
    job.ranges = ranges;
    for (int t = 0; t < n; ++t) {
      ranges[t].next.store(num_chunks * t / n, std::memory_order_relaxed);
      ranges[t].end = num_chunks * (t + 1) / n;
    }
  }
  const auto t0 = Clock::now();
  omp.parallel(&omp_body, &job, unsigned(n), 0);
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  const int64_t by_others = job.by_others.load(std::memory_order_relaxed);
  const double factor = g_solo_factor.load(std::memory_order_relaxed);
  const double wasted = total - job.caller_seconds;  // the caller waiting at the barrier
  if (wasted > kLateShare * job.caller_seconds + 100e-6) {
    g_solo_left.store(int64_t(factor * wasted * 1e9), std::memory_order_relaxed);
    g_solo_factor.store(std::min(kMaxSolo, 2.0 * factor), std::memory_order_relaxed);
  } else if (by_others > 0 && factor > kMinSolo) {
    g_solo_factor.store(std::max(kMinSolo, factor / 2.0), std::memory_order_relaxed);
  }
}

// Whether this call should run on the caller alone (Note [late workers]).
bool skip_team() { return g_solo_left.load(std::memory_order_relaxed) > 0; }

// Runs every chunk on the caller and counts its time against the solo period.
void run_solo(int64_t num_chunks, const std::function<void(int64_t)>& fn) {
  const int64_t t0 = now_ns();
  for (int64_t c = 0; c < num_chunks; ++c) fn(c);
  g_solo_left.fetch_sub(now_ns() - t0, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------
// Our own pool
//
// A job is published as one 64-bit ticket: a generation (16 bits), the
// chunk count (24 bits) and the next unclaimed chunk (24 bits). A thread
// claims a chunk by a compare-and-swap that keeps generation and count, so a
// worker that wakes late claims nothing of a finished job, and one that read
// the job's function before the swap read this job's (the caller publishes
// the next job only once every chunk of this one is claimed and done).

constexpr int kIndexBits = 24;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int64_t kMaxPoolChunks = int64_t(kIndexMask);

inline uint64_t ticket(uint64_t gen, uint64_t count, uint64_t index) {
  return (gen << (2 * kIndexBits)) | (count << kIndexBits) | index;
}

class ThreadPool {
 public:
  ThreadPool() : pid_(current_pid()) {}

  int pid() const { return pid_; }
  int size() const { return int(workers_.size()); }

  // Precondition: busy_ is held by the caller.
  void run(int n, int64_t num_chunks, const std::function<void(int64_t)>& fn) {
    grow(n - 1);
    const uint64_t gen = ((ticket_.load(std::memory_order_relaxed) >> (2 * kIndexBits)) + 1) & 0xFFFF;
    fn_.store(&fn, std::memory_order_relaxed);
    mode_.store(fp_mode(), std::memory_order_relaxed);
    max_workers_.store(n - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(ticket(gen, uint64_t(num_chunks), 0), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    int64_t mine = 0;
    for (int64_t c; (c = claim(gen)) >= 0; ++mine) fn(c);
    // Only chunks a worker has claimed remain: wait for those alone.
    const int64_t others = num_chunks - mine;
    for (int spins = 0; done_.load(std::memory_order_acquire) != others; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

  std::mutex busy_;

 private:
  // The next chunk of job `gen`, or -1 when none is left.
  int64_t claim(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t index = t & kIndexMask;
      const uint64_t count = (t >> kIndexBits) & kIndexMask;
      if ((t >> (2 * kIndexBits)) != gen || index >= count) return -1;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        return int64_t(index);
      }
    }
  }

  void grow(int want) {
    while (int(workers_.size()) < want) {
      const int tid = int(workers_.size()) + 1;
      const uint64_t seen = ticket_.load(std::memory_order_relaxed) >> (2 * kIndexBits);
      workers_.emplace_back([this, tid, seen] { loop(tid, seen); });
      workers_.back().detach();
    }
  }

  // Spins for a new job for a short while (a step's groups follow each other
  // within microseconds), then sleeps.
  uint64_t wait_for_job(uint64_t seen) {
    using clock = std::chrono::steady_clock;
    const auto give_up = clock::now() + std::chrono::microseconds(200);
    for (int spins = 0;; ++spins) {
      const uint64_t gen = ticket_.load(std::memory_order_acquire) >> (2 * kIndexBits);
      if (gen != seen) return gen;
      cpu_relax();
      if ((spins & 255) == 255 && clock::now() > give_up) break;
    }
    std::unique_lock<std::mutex> lk(mu_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t gen;
    cv_.wait(lk, [&] {
      gen = ticket_.load(std::memory_order_seq_cst) >> (2 * kIndexBits);
      return gen != seen;
    });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return gen;
  }

  void loop(int tid, uint64_t seen) {
    for (;;) {
      seen = wait_for_job(seen);
      // The job's fields are read after its ticket; a claim then checks the
      // ticket is unchanged, so they belong to the job the chunk is of.
      const std::function<void(int64_t)>* fn = fn_.load(std::memory_order_relaxed);
      const unsigned mode = mode_.load(std::memory_order_relaxed);
      if (tid > max_workers_.load(std::memory_order_relaxed)) continue;
      const unsigned saved = fp_mode();
      bool set = false;
      for (int64_t c; (c = claim(seen)) >= 0;) {
        if (!set && mode != saved) {
          set_fp_mode(mode);
          set = true;
        }
        (*fn)(c);
        done_.fetch_add(1, std::memory_order_release);
      }
      if (set) set_fp_mode(saved);
    }
  }

  const int pid_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<unsigned> mode_{0};
  std::atomic<int> max_workers_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

std::mutex g_pool_mu;
ThreadPool* g_pool = nullptr;  // leaked on purpose: threads outlive static destructors

ThreadPool* get_pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  // A forked child has none of the parent's threads: start a new pool.
  if (g_pool == nullptr || g_pool->pid() != current_pid()) g_pool = new ThreadPool();
  return g_pool;
}

// ---------------------------------------------------------------------------
// The choice between them

enum class Backend { kAuto, kOpenMP, kPool };

Backend parse_backend(const std::string& name) {
  if (name == "auto" || name.empty()) return Backend::kAuto;
  if (name == "openmp") return Backend::kOpenMP;
  if (name == "pool") return Backend::kPool;
  throw std::invalid_argument("unknown threads backend '" + name + "' (expected auto, openmp or pool)");
}

Backend initial_backend() {
  const char* env = std::getenv("FUSEDOPTIM_THREADS");
  if (env == nullptr) return Backend::kAuto;
  try {
    return parse_backend(env);
  } catch (const std::invalid_argument&) {
    return Backend::kAuto;  // Python warns about the value
  }
}

std::atomic<Backend> g_backend{initial_backend()};

bool use_openmp() {
  const Backend b = g_backend.load(std::memory_order_relaxed);
  return b != Backend::kPool && openmp().parallel != nullptr;
}

}  // namespace

void parallel_chunks(int num_threads, int64_t num_chunks, const std::function<void(int64_t)>& fn) {
  if (num_chunks <= 0) return;
  const int n = int(std::min<int64_t>(num_threads, num_chunks));
  if (n <= 1) {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
    return;
  }
  if (use_openmp()) {
    if (skip_team()) {
      run_solo(num_chunks, fn);
    } else {
      run_openmp(openmp(), n, num_chunks, fn);
    }
    return;
  }
  ThreadPool* pool = get_pool();
  std::unique_lock<std::mutex> busy(pool->busy_, std::try_to_lock);
  if (!busy.owns_lock() || num_chunks > kMaxPoolChunks) {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
    return;
  }
  pool->run(n, num_chunks, fn);
}

std::string threads_backend() {
  if (use_openmp()) return "openmp (" + openmp().path + ")";
  return "pool";
}

int pool_size() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_pool == nullptr ? 0 : g_pool->size();
}

void set_threads_backend(const std::string& name) {
  const Backend b = parse_backend(name);
  if (b == Backend::kOpenMP && openmp().parallel == nullptr) {
    throw std::runtime_error("no OpenMP runtime is loaded in this process");
  }
  g_backend.store(b);
}

}  // namespace cpu
}  // namespace fusedoptim
