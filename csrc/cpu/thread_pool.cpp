#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FO_HAVE_MXCSR 1
#endif

namespace fusedoptim {
namespace cpu {
namespace {

// Workers take the caller's floating-point environment for each job
// (flush-to-zero and denormals-are-zero, as torch.set_flush_denormal sets
// them), so the thread count never changes a result.
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

int current_pid() {
#if defined(_WIN32)
  return 0;
#else
  return int(getpid());
#endif
}

class ThreadPool {
 public:
  ThreadPool() : pid_(current_pid()) {}

  int pid() const { return pid_; }
  int size() const { return int(workers_.size()); }

  // Precondition: busy_ is held by the caller.
  void run(int n, const std::function<void(int)>& fn) {
    grow(n - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      job_threads_ = n;
      job_fp_mode_ = fp_mode();
      remaining_.store(n - 1, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    fn(0);
    // Workers finish within microseconds of us on a memory-bound loop: spin
    // briefly, then sleep.
    for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 20000) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return remaining_.load(std::memory_order_acquire) == 0; });
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    job_ = nullptr;
  }

  std::mutex busy_;

 private:
  void grow(int want) {
    while (int(workers_.size()) < want) {
      const int tid = int(workers_.size()) + 1;
      unsigned long long start;
      {
        std::lock_guard<std::mutex> lk(mu_);
        start = generation_;  // the next job is the first this worker takes
      }
      workers_.emplace_back([this, tid, start] { loop(tid, start); });
      workers_.back().detach();
    }
  }

  void loop(int tid, unsigned long long seen) {
    for (;;) {
      const std::function<void(int)>* job;
      int n;
      unsigned mode;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        n = job_threads_;
        mode = job_fp_mode_;
      }
      if (job == nullptr || tid >= n) continue;
      set_fp_mode(mode);
      (*job)(tid);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_all();
      }
    }
  }

  const int pid_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  unsigned long long generation_ = 0;
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0;
  unsigned job_fp_mode_ = 0;
  std::atomic<int> remaining_{0};
};

std::mutex g_pool_mu;
ThreadPool* g_pool = nullptr;  // leaked on purpose: threads outlive static destructors

ThreadPool* get_pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  // A forked child has none of the parent's threads: start a new pool.
  if (g_pool == nullptr || g_pool->pid() != current_pid()) g_pool = new ThreadPool();
  return g_pool;
}

}  // namespace

void parallel_run(int num_threads, const std::function<void(int)>& fn) {
  if (num_threads <= 1) {
    fn(0);
    return;
  }
  ThreadPool* pool = get_pool();
  std::unique_lock<std::mutex> busy(pool->busy_, std::try_to_lock);
  if (!busy.owns_lock()) {
    for (int t = 0; t < num_threads; ++t) fn(t);
    return;
  }
  pool->run(num_threads, fn);
}

int pool_size() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_pool == nullptr ? 0 : g_pool->size();
}

}  // namespace cpu
}  // namespace fusedoptim
