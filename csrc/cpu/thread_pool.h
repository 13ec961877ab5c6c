// Running the CPU kernels on several threads.
//
// Note [threads]
// ~~~~~~~~~~~~~~
// The step runs right after torch's own parallel work (forward, backward,
// zero_grad). torch's OpenMP workers spin for a while after each parallel
// region, so a second set of threads of our own would compete with them for
// the same cores. We therefore run on torch's own team: the OpenMP runtime
// torch has already loaded is found in the process at run time (its
// GOMP_parallel entry point, which libgomp and LLVM's libomp both export),
// never linked, so no second runtime is ever loaded. Where no OpenMP runtime
// is loaded (a torch built without OpenMP), a small pool of our own threads
// takes its place. FUSEDOPTIM_THREADS=pool|openmp forces one for tests and
// benchmarks.
//
// Either way the work is a list of chunks that threads claim from atomic
// counters, the calling thread included (on torch's team each thread starts
// on a home share of its own: Note [home chunks]): a thread the OS has not scheduled
// (another process on its core) holds up no chunk but the one it took, and
// with our own pool the caller never waits for a worker that has not started.
// Every chunk's result is the same whichever thread computes it, so any
// thread count and any split give the same bits.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace fusedoptim {
namespace cpu {

// Runs fn(c) for every chunk c in [0, num_chunks) on up to num_threads
// threads (the caller among them) and returns when all have run. Calls from
// several threads at once are safe.
void parallel_chunks(int num_threads, int64_t num_chunks, const std::function<void(int64_t)>& fn);

// Which threads parallel_chunks uses: "openmp" (with the runtime's path) or
// "pool"; and, for the pool, how many worker threads are alive.
std::string threads_backend();
int pool_size();
// Forces "openmp", "pool" or "auto" (the default); throws
// std::invalid_argument for another name and std::runtime_error for
// "openmp" where no OpenMP runtime is loaded.
void set_threads_backend(const std::string& name);

}  // namespace cpu
}  // namespace fusedoptim
