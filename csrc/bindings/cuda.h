// The CUDA part of module _C, defined in cuda.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedoptim {
namespace bind {

// Registers _C.cuda_emulation (always), _C.cuda (when built with nvcc) and _C.cuda_info.
void def_cuda(pybind11::module_& m);

}  // namespace bind
}  // namespace fusedoptim
