// A small pool of our own threads for the CPU kernels.
//
// fusedoptim does not use OpenMP, so it can never load a second OpenMP
// runtime next to torch's (libgomp vs libiomp) or oversubscribe the cores
// through nested parallel regions. The caller chooses the thread count per
// call (Python passes torch.get_num_threads() unless told otherwise).
#pragma once

#include <functional>

namespace fusedoptim {
namespace cpu {

// Runs fn(tid) for every tid in [0, num_threads), the calling thread taking
// tid 0, and returns when all have finished. Calls from several threads at
// once are safe: a call that finds the pool busy runs all its tids itself.
void parallel_run(int num_threads, const std::function<void(int)>& fn);

// Worker threads currently alive (for tests and backend_info).
int pool_size();

}  // namespace cpu
}  // namespace fusedoptim
