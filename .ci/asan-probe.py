"""A kernel told to read and write past the end of a tensor: CI runs this
under AddressSanitizer and requires a heap-buffer-overflow report, so that
a clean ASan run of the tests means something."""

import torch

import fusedoptim
from fusedoptim import _C

print("fusedoptim from", fusedoptim.__file__, "variant", fusedoptim.backend_info()["isa"], flush=True)
p = torch.zeros(1000)
g = torch.ones(1100)
_C.sgd_step([p.data_ptr()], [g.data_ptr()], None, None, [1100], _C.DTYPE_FLOAT32, 0.1, 0.0, 0.0, 0.0, False, False, 1)
print("no report")
